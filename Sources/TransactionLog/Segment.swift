/// The name of a log segment: `log-<9-digit sequence>-<origin host>`, as in MARS.
public struct SegmentName: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let sequence: UInt64
    public let host: String

    public static let maxSequence: UInt64 = 999_999_999

    /// Nil when `sequence` or `host` could not be part of a safe file name.
    public init?(sequence: UInt64, host: String) {
        guard (1...Self.maxSequence).contains(sequence), SafeName.isValid(host) else { return nil }
        self.sequence = sequence
        self.host = host
    }

    /// Parses a file name; nil for anything that is not exactly a segment name.
    public init?(fileName: String) {
        let parts = fileName.split(separator: "-", maxSplits: 2, omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "log", parts[1].utf8.count == 9, parts[1].utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            let sequence = UInt64(parts[1])
        else { return nil }
        self.init(sequence: sequence, host: String(parts[2]))
    }

    public var fileName: String {
        let digits = String(sequence)
        return "log-" + String(repeating: "0", count: 9 - digits.count) + digits + "-" + host
    }

    public var description: String { fileName }

    public static func < (a: SegmentName, b: SegmentName) -> Bool {
        (a.sequence, a.host) < (b.sequence, b.host)
    }
}

/// The first 64 bytes of every segment file.
public struct SegmentHeader: Equatable, Sendable {
    public var sequence: UInt64
    /// LSN of the first record of the segment.
    public var firstLSN: UInt64
    /// The epoch when the segment was opened.
    public var epoch: UInt64
    /// Digest of the history before this segment (16 bytes), so hosts can compare histories.
    public var previousDigest: [UInt8]

    /// "MARSLOG1" in file byte order.
    public static let magic: UInt64 = 0x3147_4F4C_5352_414D
    public static let version: UInt16 = 1
    public static let size = 64

    public init(sequence: UInt64, firstLSN: UInt64, epoch: UInt64, previousDigest: [UInt8]) {
        precondition(previousDigest.count == 16, "the history digest is 16 bytes")
        self.sequence = sequence
        self.firstLSN = firstLSN
        self.epoch = epoch
        self.previousDigest = previousDigest
    }

    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.size)
        out.appendLittleEndian(Self.magic)
        out.appendLittleEndian(Self.version)
        out.appendLittleEndian(UInt16(Self.size))
        out.appendLittleEndian(UInt32(0))
        out.appendLittleEndian(sequence)
        out.appendLittleEndian(firstLSN)
        out.appendLittleEndian(epoch)
        out.append(contentsOf: previousDigest)
        out.appendLittleEndian(UInt32(0))
        out.appendLittleEndian(CRC32C.checksum(out))
        return out
    }

    public enum Defect: Error, Equatable, Sendable {
        case incomplete
        case badMagic
        case unsupportedVersion(UInt16)
        case checksumMismatch
    }

    public static func decode(_ bytes: UnsafeRawBufferPointer) -> Result<SegmentHeader, Defect> {
        guard bytes.count >= size else { return .failure(.incomplete) }
        func load<T: FixedWidthInteger>(_ at: Int, as type: T.Type) -> T {
            bytes.loadLittleEndian(at: at, as: type)
        }
        guard load(0, as: UInt64.self) == magic else { return .failure(.badMagic) }
        let version = load(8, as: UInt16.self)
        guard version == Self.version, load(10, as: UInt16.self) == UInt16(size) else {
            return .failure(.unsupportedVersion(version))
        }
        guard load(60, as: UInt32.self) == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<60])) else {
            return .failure(.checksumMismatch)
        }
        return .success(
            SegmentHeader(
                sequence: load(16, as: UInt64.self), firstLSN: load(24, as: UInt64.self), epoch: load(32, as: UInt64.self),
                previousDigest: Array(bytes[40..<56])
            )
        )
    }
}

/// Host and resource names become parts of file, directory and export names, so only a safe subset
/// is allowed (no path tricks). One rule, stated once for every message that refuses a name.
public enum SafeName {
    public static let rule = "1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"

    public static func isValid(_ name: String) -> Bool {
        guard (1...64).contains(name.utf8.count), let first = name.utf8.first, first != UInt8(ascii: "."),
            first != UInt8(ascii: "-")
        else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
        }
    }

    /// Why `name` is refused ("resource name 'x/y' is not allowed: use ..."), or nil when it is valid.
    /// `kind` names what the name is for: "resource", "host".
    public static func refusal(_ name: String, kind: String) -> String? {
        isValid(name) ? nil : "\(kind) name '\(name)' is not allowed: use \(rule)"
    }
}
