/// The kinds of log records. Raw values are the on-disk type byte (docs/log-format.md).
public enum LogRecordType: UInt8, Sendable, CaseIterable {
    /// Data written to the device; the payload is the data.
    case write = 1
    /// A range the device may discard (TRIM). No payload.
    case trim = 2
    /// A range that reads as zeroes afterwards. No payload; flag `noHole` keeps it allocated.
    case writeZeroes = 3
    /// The primary generation changes to `epoch` here (the first record of every history). No range.
    case epoch = 5
    /// The primary of `epoch` ends it here and hands over: `offset` is the epoch it promises its
    /// successor. The last record of its segment; the next record must be an epoch record of at
    /// least that epoch (docs/log-format.md, "The seal"). No range, no payload.
    case seal = 6

    public var carriesRange: Bool { self == .write || self == .trim || self == .writeZeroes }
}

/// Flags of a record (16 bits on disk).
public struct LogRecordFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// WRITE_ZEROES without punching holes.
    public static let noHole = Self(rawValue: 1 << 0)
    /// The client asked for this write to be durable before its reply (FUA).
    public static let fua = Self(rawValue: 1 << 1)

    static let known: Self = [.noHole, .fua]
}

/// One record of the transaction log: a block change (or a marker) at a position of the history.
public struct LogRecord: Sendable, Equatable {
    public var type: LogRecordType
    public var flags: LogRecordFlags
    /// Position of this record in the resource's log history (bytes of records before it).
    public var lsn: UInt64
    public var epoch: UInt64
    /// Device byte offset and length affected (0 for markers; a seal's `offset` is the epoch it
    /// promises, see `LogRecord.seal`).
    public var offset: UInt64
    public var length: UInt64
    /// The data of a write; empty otherwise.
    public var payload: [UInt8]
    /// Bytes of the same group commit before this record: everything before `lsn - commitOffset`
    /// was durable when the record was written. 0 claims nothing beyond the record itself. Readers
    /// use it to tell bytes a power loss cut out of an unfinished commit from corrupted durable
    /// bytes (docs/log-format.md).
    public var commitOffset: UInt32

    public init(
        type: LogRecordType, flags: LogRecordFlags = [], lsn: UInt64, epoch: UInt64, offset: UInt64 = 0,
        length: UInt64 = 0, payload: [UInt8] = [], commitOffset: UInt32 = 0
    ) {
        self.type = type
        self.flags = flags
        self.lsn = lsn
        self.epoch = epoch
        self.offset = offset
        self.length = length
        self.payload = payload
        self.commitOffset = commitOffset
    }

    /// The record that ends `epoch` at `lsn` and promises `nextEpoch` to the successor.
    public static func seal(lsn: UInt64, epoch: UInt64, nextEpoch: UInt64) -> LogRecord {
        LogRecord(type: .seal, lsn: lsn, epoch: epoch, offset: nextEpoch)
    }

    /// The epoch a seal promises to its successor; nil for any other record.
    public var promisedEpoch: UInt64? { type == .seal ? offset : nil }

    /// Where the group commit that wrote this record began: the log was durable up to here.
    public var commitStart: UInt64 { lsn - UInt64(commitOffset) }

    /// Bytes this record occupies on disk.
    public var encodedSize: Int { LogRecordLayout.recordSize(payload: payload.count) }

    /// Appends the on-disk form (little-endian header, payload, CRC32C of both).
    public func encode(into out: inout [UInt8]) {
        out.reserveCapacity(out.count + encodedSize)
        let crc = encodeHeader(into: &out)
        out.append(contentsOf: payload)
        out.appendLittleEndian(crc)
    }

    /// Appends the 48-byte header and returns the record's checksum (over header and payload), so a
    /// writer can send the payload from where it is, without copying it behind the header.
    @discardableResult
    public func encodeHeader(into out: inout [UInt8]) -> UInt32 {
        encodeHeader(into: &out, payloadChecksum: CRC32C.checksum(payload))
    }

    /// `encodeHeader(into:)` with the payload's CRC32C computed earlier, where the payload was at hand
    /// (the log writer would read it again from memory another CPU wrote).
    @discardableResult
    public func encodeHeader(into out: inout [UInt8], payloadChecksum: UInt32) -> UInt32 {
        let start = out.count
        out.appendLittleEndian(LogRecordLayout.magic)
        out.append(LogRecordLayout.version)
        out.append(type.rawValue)
        out.appendLittleEndian(flags.rawValue)
        out.appendLittleEndian(UInt32(payload.count))
        out.appendLittleEndian(commitOffset)
        out.appendLittleEndian(lsn)
        out.appendLittleEndian(epoch)
        out.appendLittleEndian(offset)
        out.appendLittleEndian(length)
        let headerCRC = out.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[start...])) }
        return CRC32C.combine(headerCRC, payloadChecksum, secondLength: payload.count)
    }

    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        encode(into: &out)
        return out
    }
}

/// The fixed layout of a record (docs/log-format.md).
public enum LogRecordLayout {
    /// "MLRC" in little-endian byte order.
    public static let magic: UInt32 = 0x4352_4C4D
    public static let version: UInt8 = 1
    public static let headerSize = 48
    public static let trailerSize = 4
    /// A write larger than any NBD payload is not a record this version writes.
    public static let maxPayload = 32 << 20

    /// Bytes a record with `payload` bytes of payload occupies on disk.
    public static func recordSize(payload: Int) -> Int { headerSize + payload + trailerSize }
}

/// Why bytes at a position are not a valid record.
public enum RecordDefect: Error, Equatable, Sendable {
    /// Fewer bytes than the record needs (a write cut short, or the end of the data).
    case incomplete
    case badMagic
    case unsupportedVersion(UInt8)
    case unknownType(UInt8)
    case invalidField(String)
    case checksumMismatch
    case unexpectedPosition(expected: UInt64, found: UInt64)
}

/// Decodes the record at `position` of `bytes`, or says what is wrong there.
/// - Parameter expectedLSN: the LSN the record must carry; nil to accept any.
public func decodeRecord(
    _ bytes: UnsafeRawBufferPointer, at position: Int, expectedLSN: UInt64?
) -> Result<LogRecord, RecordDefect> {
    let available = bytes.count - position
    guard available >= LogRecordLayout.headerSize else { return .failure(.incomplete) }
    func load<T: FixedWidthInteger>(_ at: Int, as type: T.Type) -> T {
        bytes.loadLittleEndian(at: position + at, as: type)
    }
    guard load(0, as: UInt32.self) == LogRecordLayout.magic else { return .failure(.badMagic) }
    let version = bytes[position + 4]
    guard version == LogRecordLayout.version else { return .failure(.unsupportedVersion(version)) }
    guard let type = LogRecordType(rawValue: bytes[position + 5]) else {
        return .failure(.unknownType(bytes[position + 5]))
    }
    let flags = LogRecordFlags(rawValue: load(6, as: UInt16.self))
    let payloadLength = Int(load(8, as: UInt32.self))
    let commitOffset = load(12, as: UInt32.self)
    let lsn = load(16, as: UInt64.self)
    let epoch = load(24, as: UInt64.self)
    let offset = load(32, as: UInt64.self)
    let length = load(40, as: UInt64.self)
    guard payloadLength <= LogRecordLayout.maxPayload else {
        return .failure(.invalidField("payload length \(payloadLength)"))
    }
    let total = LogRecordLayout.recordSize(payload: payloadLength)
    guard available >= total else { return .failure(.incomplete) }
    let stored = load(LogRecordLayout.headerSize + payloadLength, as: UInt32.self)
    let computed = CRC32C.checksum(
        UnsafeRawBufferPointer(rebasing: bytes[position..<(position + LogRecordLayout.headerSize + payloadLength)])
    )
    guard stored == computed else { return .failure(.checksumMismatch) }
    // Fields are checked after the checksum: a record that passes it was written this way.
    guard flags.isSubset(of: .known) else { return .failure(.invalidField("reserved bits set")) }
    guard UInt64(commitOffset) <= lsn else { return .failure(.invalidField("commit offset \(commitOffset) before LSN 0")) }
    if type == .write {
        guard payloadLength > 0, UInt64(payloadLength) == length else {
            return .failure(.invalidField("write of \(length) bytes with \(payloadLength) bytes of payload"))
        }
    } else if payloadLength != 0 {
        return .failure(.invalidField("\(type) record with a payload"))
    }
    switch type {
    case .seal:
        guard offset > epoch, length == 0 else {
            return .failure(.invalidField("seal of epoch \(epoch) promising epoch \(offset) with length \(length)"))
        }
    case .epoch:
        guard offset == 0, length == 0 else { return .failure(.invalidField("epoch record with a range")) }
    case .write, .trim, .writeZeroes:
        break
    }
    if type.carriesRange, offset.addingReportingOverflow(length).overflow {
        return .failure(.invalidField("range overflows"))
    }
    if let expectedLSN, lsn != expectedLSN {
        return .failure(.unexpectedPosition(expected: expectedLSN, found: lsn))
    }
    let payload = Array(
        UnsafeRawBufferPointer(
            rebasing: bytes[(position + LogRecordLayout.headerSize)..<(position + LogRecordLayout.headerSize + payloadLength)]
        )
    )
    return .success(
        LogRecord(
            type: type, flags: flags, lsn: lsn, epoch: epoch, offset: offset, length: length, payload: payload,
            commitOffset: commitOffset
        )
    )
}

extension UnsafeRawBufferPointer {
    func loadLittleEndian<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

extension [UInt8] {
    public mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}
