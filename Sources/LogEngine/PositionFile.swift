import BlockStore
import TransactionLog

/// The persisted writeback position of a resource: every record before `writebackLSN` is on the
/// data device, durably. Recovery replays from here.
///
/// The file holds two 64-byte slots written alternately, each with a generation number and a
/// CRC32C; the valid slot with the higher generation wins. A write torn by a power loss damages
/// only the slot being written, so the previous position stays readable (docs/log-format.md).
struct PositionFile {
    static let name = "writeback-position"
    static let slotSize = 64
    /// "MARSPOS1" in file byte order.
    static let magic: UInt64 = 0x3153_4F50_5352_414D
    static let version: UInt16 = 1

    private let file: any StorageFile
    private(set) var generation: UInt64
    private(set) var writebackLSN: UInt64
    /// A replica's replay writes the records before `intentLSN` after storing it: while it is beyond
    /// `writebackLSN`, a crash may have left the device between two prefixes (Inconsistent).
    private(set) var intentLSN: UInt64
    /// The epoch of the history at `writebackLSN` (a replica resumes its epoch checks with it).
    private(set) var epoch: UInt64

    /// Creates the file for a new resource (position 0) and makes it durable.
    static func create(in directory: any StorageDirectory) throws(SystemError) -> PositionFile {
        let file = try directory.open(name, create: true)
        var position = PositionFile(file: file, generation: 0, writebackLSN: 0, intentLSN: 0, epoch: 0)
        try position.store(0)
        return position
    }

    /// Reads the position of an existing resource; nil when neither slot is valid.
    static func open(in directory: any StorageDirectory) throws(SystemError) -> PositionFile? {
        let file = try directory.open(name, create: false)
        let bytes = try file.read(count: 2 * slotSize, at: 0)
        let slots = [0, 1].compactMap { slot in decode(bytes, slot: slot) }
        guard let best = slots.max(by: { $0.generation < $1.generation }) else { return nil }
        return PositionFile(file: file, generation: best.generation, writebackLSN: best.lsn, intentLSN: best.intent, epoch: best.epoch)
    }

    private init(file: any StorageFile, generation: UInt64, writebackLSN: UInt64, intentLSN: UInt64, epoch: UInt64) {
        self.file = file
        self.generation = generation
        self.writebackLSN = writebackLSN
        self.intentLSN = intentLSN
        self.epoch = epoch
    }

    /// Persists `lsn` (and the intent and epoch, see there) in the slot the current position is
    /// not in, then syncs.
    mutating func store(_ lsn: UInt64, intent: UInt64? = nil, epoch: UInt64? = nil) throws(SystemError) {
        let next = generation + 1
        let intent = intent ?? lsn
        let epoch = epoch ?? self.epoch
        try file.write(
            Self.encode(generation: next, lsn: lsn, intent: intent, epoch: epoch), at: UInt64((next % 2) * UInt64(Self.slotSize))
        )
        try file.sync()
        generation = next
        writebackLSN = lsn
        intentLSN = intent
        self.epoch = epoch
    }

    static func encode(generation: UInt64, lsn: UInt64, intent: UInt64 = 0, epoch: UInt64 = 0) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(slotSize)
        out.appendLE(magic)
        out.appendLE(version)
        out.appendLE(UInt16(slotSize))
        out.appendLE(UInt32(0))
        out.appendLE(generation)
        out.appendLE(lsn)
        out.appendLE(intent)
        out.appendLE(epoch)
        out += [UInt8](repeating: 0, count: 60 - out.count)
        out.appendLE(CRC32C.checksum(out))
        return out
    }

    static func decode(_ bytes: [UInt8], slot: Int) -> (generation: UInt64, lsn: UInt64, intent: UInt64, epoch: UInt64)? {
        let start = slot * slotSize
        guard bytes.count >= start + slotSize else { return nil }
        let slotBytes = Array(bytes[start..<(start + slotSize)])
        func load<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            slotBytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: T.self)) }
        }
        guard load(0, UInt64.self) == magic, load(8, UInt16.self) == version, load(10, UInt16.self) == UInt16(slotSize),
            load(60, UInt32.self) == CRC32C.checksum(Array(slotBytes[0..<60]))
        else { return nil }
        return (load(16, UInt64.self), load(24, UInt64.self), load(32, UInt64.self), load(40, UInt64.self))
    }
}

extension [UInt8] {
    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}
