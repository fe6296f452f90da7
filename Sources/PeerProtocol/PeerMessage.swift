import NIOCore

/// The client's first message.
public struct PeerHello: Sendable, Equatable {
    public var version: UInt16
    public var cluster: String
    public var host: String
    public var hostID: String
    /// 32 random bytes, so the server's proof cannot be replayed.
    public var nonce: [UInt8]

    public init(version: UInt16, cluster: String, host: String, hostID: String, nonce: [UInt8]) {
        self.version = version
        self.cluster = cluster
        self.host = host
        self.hostID = hostID
        self.nonce = nonce
    }
}

/// The server's answer to a hello: its identity, its nonce and its proof of the cluster secret.
public struct PeerChallenge: Sendable, Equatable {
    public var version: UInt16
    public var host: String
    public var hostID: String
    public var nonce: [UInt8]
    /// HMAC-SHA256 over both nonces and both identities (`PeerHandshake`).
    public var proof: [UInt8]

    public init(version: UInt16, host: String, hostID: String, nonce: [UInt8], proof: [UInt8]) {
        self.version = version
        self.host = host
        self.hostID = hostID
        self.nonce = nonce
        self.proof = proof
    }
}

/// Stream the bytes of `segment` from `offset`, keeping at most `window` bytes beyond the last
/// acknowledged position in flight.
public struct FetchRequest: Sendable, Equatable {
    public var resource: String
    public var segment: String
    public var offset: UInt64
    public var window: UInt64
    /// The asker's history epoch at its end: a source whose own history is at an older epoch
    /// answers `staleSource` (a primary learns from it that it was deposed).
    public var epoch: UInt64

    public init(resource: String, segment: String, offset: UInt64, window: UInt64, epoch: UInt64) {
        self.resource = resource
        self.segment = segment
        self.offset = offset
        self.window = window
        self.epoch = epoch
    }
}

/// Bytes of a log segment, starting at byte `offset` of the segment file.
public struct SegmentData: Sendable, Equatable {
    public var resource: String
    public var segment: String
    public var offset: UInt64
    /// Bulk: sent and received without a copy (`PeerMessage.payload`).
    public var bytes: ByteBuffer

    public init(resource: String, segment: String, offset: UInt64, bytes: ByteBuffer) {
        self.resource = resource
        self.segment = segment
        self.offset = offset
        self.bytes = bytes
    }

    public init(resource: String, segment: String, offset: UInt64, bytes: [UInt8]) {
        self.init(resource: resource, segment: segment, offset: offset, bytes: ByteBuffer(bytes: bytes))
    }
}

/// The segment is closed at `size` bytes; `next` names the following segment ("" if none yet).
public struct SegmentEnd: Sendable, Equatable {
    public var resource: String
    public var segment: String
    public var size: UInt64
    public var next: String

    public init(resource: String, segment: String, size: UInt64, next: String) {
        self.resource = resource
        self.segment = segment
        self.size = size
        self.next = next
    }
}

/// The receiver has made the segment's bytes up to `offset` durable.
public struct FetchAck: Sendable, Equatable {
    public var resource: String
    public var segment: String
    public var offset: UInt64

    public init(resource: String, segment: String, offset: UInt64) {
        self.resource = resource
        self.segment = segment
        self.offset = offset
    }
}

public enum FetchErrorCode: UInt16, Sendable {
    case noSuchResource = 1
    case segmentGone = 2
    case notPrimary = 3
    case forked = 4
    case internalError = 5
    /// This host's history is at an older epoch than the asker's: it is no source for it (a
    /// primary that answers this has been deposed).
    case staleSource = 6
}

/// A fetch or sync that the sender cannot serve.
public struct FetchError: Sendable, Equatable {
    public var resource: String
    /// Raw, so a code from a newer peer still decodes; see `errorCode`.
    public var code: UInt16
    public var reason: String

    public init(resource: String, code: UInt16, reason: String) {
        self.resource = resource
        self.code = code
        self.reason = reason
    }

    public init(resource: String, code: FetchErrorCode, reason: String) {
        self.init(resource: resource, code: code.rawValue, reason: reason)
    }

    /// The code, if this host knows it.
    public var errorCode: FetchErrorCode? { FetchErrorCode(rawValue: code) }
}

/// The primary's log position, the answer to `syncBegin`.
public struct SyncPosition: Sendable, Equatable {
    public var resource: String
    public var size: UInt64
    public var lsn: UInt64
    public var segment: String
    public var segmentFirstLSN: UInt64
    public var epoch: UInt64

    public init(resource: String, size: UInt64, lsn: UInt64, segment: String, segmentFirstLSN: UInt64, epoch: UInt64) {
        self.resource = resource
        self.size = size
        self.lsn = lsn
        self.segment = segment
        self.segmentFirstLSN = segmentFirstLSN
        self.epoch = epoch
    }
}

/// Digests of consecutive chunks of `chunkSize` bytes from `offset`; the primary answers with the
/// chunks that differ (`syncData`/`syncZero`), then `syncCompared`.
public struct SyncCompare: Sendable, Equatable {
    public var resource: String
    public var offset: UInt64
    public var chunkSize: UInt32
    /// Each exactly 16 bytes; at most 1024.
    public var digests: [[UInt8]]

    public init(resource: String, offset: UInt64, chunkSize: UInt32, digests: [[UInt8]]) {
        self.resource = resource
        self.offset = offset
        self.chunkSize = chunkSize
        self.digests = digests
    }
}

/// Device bytes at `offset`.
public struct SyncData: Sendable, Equatable {
    public var resource: String
    public var offset: UInt64
    /// Bulk: sent and received without a copy (`PeerMessage.payload`).
    public var bytes: ByteBuffer

    public init(resource: String, offset: UInt64, bytes: ByteBuffer) {
        self.resource = resource
        self.offset = offset
        self.bytes = bytes
    }

    public init(resource: String, offset: UInt64, bytes: [UInt8]) {
        self.init(resource: resource, offset: offset, bytes: ByteBuffer(bytes: bytes))
    }
}

/// `length` zero bytes at `offset`, sent instead of the zeroes themselves.
public struct SyncZero: Sendable, Equatable {
    public var resource: String
    public var offset: UInt64
    public var length: UInt64

    public init(resource: String, offset: UInt64, length: UInt64) {
        self.resource = resource
        self.offset = offset
        self.length = length
    }
}

/// Every differing chunk of the compare request at `offset` (of `count` digests) was sent.
public struct SyncCompared: Sendable, Equatable {
    public var resource: String
    public var offset: UInt64
    public var count: UInt32

    public init(resource: String, offset: UInt64, count: UInt32) {
        self.resource = resource
        self.offset = offset
        self.count = count
    }
}

/// One message of the peer protocol. Each travels in its own frame: `[u32 body length][u8 type][fields]`.
public enum PeerMessage: Sendable, Equatable {
    case hello(PeerHello)
    case challenge(PeerChallenge)
    case authenticate(proof: [UInt8])
    case welcome
    case refused(reason: String)
    /// Opaque here: JSON from the Cluster module.
    case gossip(entries: [UInt8])
    case fetch(FetchRequest)
    case segmentData(SegmentData)
    case segmentEnd(SegmentEnd)
    case fetchAck(FetchAck)
    case fetchError(FetchError)
    case syncBegin(resource: String)
    case syncPosition(SyncPosition)
    case syncCompare(SyncCompare)
    case syncData(SyncData)
    case syncZero(SyncZero)
    case syncCompared(SyncCompared)
    case ping(UInt64)
    case pong(UInt64)
    /// Asks the primary for its log's durable end, answered with `syncPosition` (lsn = the durable end).
    case logPosition(resource: String)

    /// The type byte on the wire.
    public var typeByte: UInt8 {
        switch self {
        case .hello: 1
        case .challenge: 2
        case .authenticate: 3
        case .welcome: 4
        case .refused: 5
        case .gossip: 6
        case .fetch: 7
        case .segmentData: 8
        case .segmentEnd: 9
        case .fetchAck: 10
        case .fetchError: 11
        case .syncBegin: 12
        case .syncPosition: 13
        case .syncCompare: 14
        case .syncData: 15
        case .syncZero: 16
        case .syncCompared: 17
        case .ping: 18
        case .pong: 19
        case .logPosition: 20
        }
    }

    /// The message's name, for errors and logs.
    public var name: String { Self.name(ofType: typeByte) ?? "?" }

    static func name(ofType type: UInt8) -> String? {
        switch type {
        case 1: "hello"
        case 2: "challenge"
        case 3: "authenticate"
        case 4: "welcome"
        case 5: "refused"
        case 6: "gossip"
        case 7: "fetch"
        case 8: "segmentData"
        case 9: "segmentEnd"
        case 10: "fetchAck"
        case 11: "fetchError"
        case 12: "syncBegin"
        case 13: "syncPosition"
        case 14: "syncCompare"
        case 15: "syncData"
        case 16: "syncZero"
        case 17: "syncCompared"
        case 18: "ping"
        case 19: "pong"
        case 20: "logPosition"
        default: nil
        }
    }
}

extension PeerMessage {
    /// The bulk bytes of `segmentData` and `syncData`, their last field.
    public var payload: ByteBuffer? {
        switch self {
        case .segmentData(let m): m.bytes
        case .syncData(let m): m.bytes
        default: nil
        }
    }

    /// Appends the frame, length prefix included. `leavingOutPayload`: everything but the bytes
    /// of `payload`, which the caller writes right after (so that they reach the socket without
    /// a copy); the length prefix counts them. The caller keeps bulk payloads well under
    /// `PeerWire.maxFrameBody`; a larger frame is written but the peer rejects it.
    public func encodeFrame(into out: inout ByteBuffer, leavingOutPayload: Bool = false) {
        let lengthAt = out.writerIndex
        out.writeField(UInt32(0))
        out.writeField(typeByte)
        encodeFields(into: &out)
        var leftOut = 0
        if let payload {
            out.writeField(UInt32(payload.readableBytes))
            if leavingOutPayload { leftOut = payload.readableBytes } else { out.writeImmutableBuffer(payload) }
        }
        out.setInteger(UInt32(out.writerIndex - lengthAt - 4 + leftOut), at: lengthAt, endianness: .little)
    }

    public func encodedFrame() -> [UInt8] {
        var out = ByteBuffer()
        encodeFrame(into: &out)
        return Array(out.readableBytesView)
    }

    private func encodeFields(into w: inout ByteBuffer) {
        switch self {
        case .hello(let m):
            w.writeField(m.version)
            w.writeField(m.cluster)
            w.writeField(m.host)
            w.writeField(m.hostID)
            w.writeField(m.nonce)
        case .challenge(let m):
            w.writeField(m.version)
            w.writeField(m.host)
            w.writeField(m.hostID)
            w.writeField(m.nonce)
            w.writeField(m.proof)
        case .authenticate(let proof):
            w.writeField(proof)
        case .welcome:
            break
        case .refused(let reason):
            w.writeField(reason)
        case .gossip(let entries):
            w.writeField(entries)
        case .fetch(let m):
            w.writeField(m.resource)
            w.writeField(m.segment)
            w.writeField(m.offset)
            w.writeField(m.window)
            w.writeField(m.epoch)
        case .segmentData(let m):
            w.writeField(m.resource)
            w.writeField(m.segment)
            w.writeField(m.offset)
        case .segmentEnd(let m):
            w.writeField(m.resource)
            w.writeField(m.segment)
            w.writeField(m.size)
            w.writeField(m.next)
        case .fetchAck(let m):
            w.writeField(m.resource)
            w.writeField(m.segment)
            w.writeField(m.offset)
        case .fetchError(let m):
            w.writeField(m.resource)
            w.writeField(m.code)
            w.writeField(m.reason)
        case .syncBegin(let resource), .logPosition(let resource):
            w.writeField(resource)
        case .syncPosition(let m):
            w.writeField(m.resource)
            w.writeField(m.size)
            w.writeField(m.lsn)
            w.writeField(m.segment)
            w.writeField(m.segmentFirstLSN)
            w.writeField(m.epoch)
        case .syncCompare(let m):
            w.writeField(m.resource)
            w.writeField(m.offset)
            w.writeField(m.chunkSize)
            w.writeField(UInt32(m.digests.count))
            for digest in m.digests { w.writeField(digest) }
        case .syncData(let m):
            w.writeField(m.resource)
            w.writeField(m.offset)
        case .syncZero(let m):
            w.writeField(m.resource)
            w.writeField(m.offset)
            w.writeField(m.length)
        case .syncCompared(let m):
            w.writeField(m.resource)
            w.writeField(m.offset)
            w.writeField(m.count)
        case .ping(let value), .pong(let value):
            w.writeField(value)
        }
    }

    /// Decodes one frame body (type byte and fields, without the length prefix), which must be
    /// consumed exactly.
    public static func decode(body: [UInt8]) throws(PeerProtocolError) -> PeerMessage {
        try decode(body: ByteBuffer(bytes: body))
    }

    /// The same, from a slice of the received bytes; `bytes` of `segmentData` and `syncData`
    /// stay slices of it.
    public static func decode(body: ByteBuffer) throws(PeerProtocolError) -> PeerMessage {
        guard let type = body.getInteger(at: body.readerIndex, as: UInt8.self) else { throw PeerProtocolError("empty frame body (no message type)") }
        guard let name = name(ofType: type) else { throw PeerProtocolError("unknown message type \(type)") }
        var r = WireReader(body: body, message: name)
        let message: PeerMessage
        switch type {
        case 1:
            message = .hello(
                PeerHello(
                    version: try r.integer(UInt16.self, "version"),
                    cluster: try r.string("cluster"),
                    host: try r.string("host"),
                    hostID: try r.string("hostID"),
                    nonce: try r.fixedBlob("nonce", count: PeerWire.nonceBytes)
                )
            )
        case 2:
            message = .challenge(
                PeerChallenge(
                    version: try r.integer(UInt16.self, "version"),
                    host: try r.string("host"),
                    hostID: try r.string("hostID"),
                    nonce: try r.fixedBlob("nonce", count: PeerWire.nonceBytes),
                    proof: try r.fixedBlob("proof", count: PeerWire.proofBytes)
                )
            )
        case 3:
            message = .authenticate(proof: try r.fixedBlob("proof", count: PeerWire.proofBytes))
        case 4:
            message = .welcome
        case 5:
            message = .refused(reason: try r.string("reason"))
        case 6:
            message = .gossip(entries: try r.blob("entries"))
        case 7:
            message = .fetch(
                FetchRequest(
                    resource: try r.string("resource"),
                    segment: try r.string("segment"),
                    offset: try r.integer(UInt64.self, "offset"),
                    window: try r.integer(UInt64.self, "window"),
                    epoch: try r.integer(UInt64.self, "epoch")
                )
            )
        case 8:
            message = .segmentData(
                SegmentData(
                    resource: try r.string("resource"),
                    segment: try r.string("segment"),
                    offset: try r.integer(UInt64.self, "offset"),
                    bytes: try r.payload("bytes")
                )
            )
        case 9:
            message = .segmentEnd(
                SegmentEnd(
                    resource: try r.string("resource"),
                    segment: try r.string("segment"),
                    size: try r.integer(UInt64.self, "size"),
                    next: try r.string("next")
                )
            )
        case 10:
            message = .fetchAck(
                FetchAck(
                    resource: try r.string("resource"),
                    segment: try r.string("segment"),
                    offset: try r.integer(UInt64.self, "offset")
                )
            )
        case 11:
            message = .fetchError(
                FetchError(
                    resource: try r.string("resource"),
                    code: try r.integer(UInt16.self, "code"),
                    reason: try r.string("reason")
                )
            )
        case 12:
            message = .syncBegin(resource: try r.string("resource"))
        case 20:
            message = .logPosition(resource: try r.string("resource"))
        case 13:
            message = .syncPosition(
                SyncPosition(
                    resource: try r.string("resource"),
                    size: try r.integer(UInt64.self, "size"),
                    lsn: try r.integer(UInt64.self, "lsn"),
                    segment: try r.string("segment"),
                    segmentFirstLSN: try r.integer(UInt64.self, "segmentFirstLSN"),
                    epoch: try r.integer(UInt64.self, "epoch")
                )
            )
        case 14:
            let resource = try r.string("resource")
            let offset = try r.integer(UInt64.self, "offset")
            let chunkSize = try r.integer(UInt32.self, "chunkSize")
            let count = try r.integer(UInt32.self, "digests")
            guard count <= PeerWire.maxDigestsPerCompare else {
                throw PeerProtocolError(
                    "message 'syncCompare' has \(count) digests, more than the limit of \(PeerWire.maxDigestsPerCompare)"
                )
            }
            var digests: [[UInt8]] = []
            digests.reserveCapacity(Int(count))
            for _ in 0..<count {
                digests.append(try r.fixedBlob("digests", count: PeerWire.digestBytes))
            }
            message = .syncCompare(SyncCompare(resource: resource, offset: offset, chunkSize: chunkSize, digests: digests))
        case 15:
            message = .syncData(
                SyncData(
                    resource: try r.string("resource"),
                    offset: try r.integer(UInt64.self, "offset"),
                    bytes: try r.payload("bytes")
                )
            )
        case 16:
            message = .syncZero(
                SyncZero(
                    resource: try r.string("resource"),
                    offset: try r.integer(UInt64.self, "offset"),
                    length: try r.integer(UInt64.self, "length")
                )
            )
        case 17:
            message = .syncCompared(
                SyncCompared(
                    resource: try r.string("resource"),
                    offset: try r.integer(UInt64.self, "offset"),
                    count: try r.integer(UInt32.self, "count")
                )
            )
        case 18:
            message = .ping(try r.integer(UInt64.self, "value"))
        case 19:
            message = .pong(try r.integer(UInt64.self, "value"))
        default:
            throw PeerProtocolError("unknown message type \(type)")
        }
        try r.finish()
        return message
    }
}
