// Wire constants of the NBD protocol, from NetworkBlockDevice/nbd doc/proto.md.
// All integers on the wire are big-endian.

public enum NBDMagic {
    /// "NBDMAGIC": the first 8 bytes a server sends.
    public static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle greeting and the prefix of every client option.
    public static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefix of every fixed-newstyle option reply.
    public static let optionReply: UInt64 = 0x3_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags sent by the server.
public enum NBDHandshakeFlag {
    public static let fixedNewstyle: UInt16 = 1 << 0
    public static let noZeroes: UInt16 = 1 << 1
}

/// Flags the client sends back after the greeting.
public enum NBDClientFlag {
    public static let fixedNewstyle: UInt32 = 1 << 0
    public static let noZeroes: UInt32 = 1 << 1
    public static let known: UInt32 = fixedNewstyle | noZeroes
}

public enum NBDOption: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

public enum NBDOptionReply: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

public enum NBDInfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission flags (16 bits) advertised per export.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let hasFlags = Self(rawValue: 1 << 0)
    public static let readOnly = Self(rawValue: 1 << 1)
    public static let sendFlush = Self(rawValue: 1 << 2)
    public static let sendFUA = Self(rawValue: 1 << 3)
    public static let rotational = Self(rawValue: 1 << 4)
    public static let sendTrim = Self(rawValue: 1 << 5)
    public static let sendWriteZeroes = Self(rawValue: 1 << 6)
    public static let sendDF = Self(rawValue: 1 << 7)
    public static let canMultiConn = Self(rawValue: 1 << 8)
    public static let sendCache = Self(rawValue: 1 << 10)
    public static let sendFastZero = Self(rawValue: 1 << 11)
}

public enum NBDCommand: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Command flags (16 bits) of a request.
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    public static let fua = Self(rawValue: 1 << 0)
    public static let noHole = Self(rawValue: 1 << 1)
    public static let doNotFragment = Self(rawValue: 1 << 2)
    public static let requestOne = Self(rawValue: 1 << 3)
    public static let fastZero = Self(rawValue: 1 << 4)
}

public enum NBDReplyFlag {
    public static let done: UInt16 = 1 << 0
}

public enum NBDChunkType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 32769
    case errorOffset = 32770
}

/// Error values carried in replies. Clients treat unknown values as EINVAL.
public enum NBDError: UInt32, Error, Sendable {
    case permission = 1
    case io = 5
    case noMemory = 12
    case invalid = 22
    case noSpace = 28
    case overflow = 75
    case notSupported = 95
    case shutdown = 108
}

/// `base:allocation` status bits.
public enum NBDAllocationState {
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
}

public enum NBDLimits {
    /// The largest READ or WRITE payload advertised (NBD_INFO_BLOCK_SIZE maximum): the spec's
    /// portable maximum, which clients that negotiate block sizes keep to.
    public static let advertisedMaxPayload: UInt32 = 32 << 20
    /// The largest READ or WRITE payload accepted. Some clients send more without negotiating
    /// (nbd-tester-client's integrityhuge test: 33-50 MiB); nbdkit accepts up to the same 64 MiB.
    /// Memory stays bounded by the per-loop payload budget, which admits one request beyond it.
    public static let acceptedMaxPayload: UInt32 = 64 << 20
    /// Strings (export names, context names) may not exceed this.
    public static let maxString = 4096
    public static let preferredBlockSize: UInt32 = 4096
    public static let minimumBlockSize: UInt32 = 1
}

public let allocationContextName = "base:allocation"
