import Glibc
import PeerProtocol
import TestSupport

/// A property test's generator, seeded by `TestSeed` (MARS_TEST_SEED replays a failure).
func seededGenerator(_ test: String = #function) -> SplitMix64 {
    SplitMix64(state: TestSeed.make(test))
}

func bytes(_ count: Int, _ fill: UInt8) -> [UInt8] {
    (0..<count).map { fill &+ UInt8(truncatingIfNeeded: $0) }
}

/// One of each message, with every field set to something recognizable.
let sampleMessages: [PeerMessage] = [
    .hello(PeerHello(version: 1, cluster: "0123abcd", host: "alpha", hostID: "id-α", nonce: bytes(32, 1))),
    .challenge(PeerChallenge(version: 1, host: "beta", hostID: "id-beta", nonce: bytes(32, 2), proof: bytes(32, 3))),
    .authenticate(proof: bytes(32, 4)),
    .welcome,
    .refused(reason: "wrong cluster secret"),
    .gossip(entries: Array("[{\"key\":\"k\"}]".utf8)),
    .fetch(FetchRequest(resource: "vm1", segment: "log-000000007-alpha", offset: 4096, window: 8 << 20, epoch: 5)),
    .segmentData(SegmentData(resource: "vm1", segment: "log-000000007-alpha", offset: 64, bytes: bytes(100, 5))),
    .segmentEnd(SegmentEnd(resource: "vm1", segment: "log-000000007-alpha", size: 1 << 33, next: "log-000000008-beta")),
    .fetchAck(FetchAck(resource: "vm1", segment: "log-000000007-alpha", offset: 0x0102_0304_0506_0708)),
    .fetchError(FetchError(resource: "vm1", code: .forked, reason: "histories differ at LSN 7")),
    .syncBegin(resource: "vm1"),
    .syncPosition(SyncPosition(resource: "vm1", size: 1 << 30, lsn: 99, segment: "log-000000009-alpha", segmentFirstLSN: 90, epoch: 3)),
    .syncCompare(SyncCompare(resource: "vm1", offset: 1 << 20, chunkSize: 65536, digests: [bytes(16, 6), bytes(16, 7)])),
    .syncData(SyncData(resource: "vm1", offset: 1 << 20, bytes: bytes(300, 8))),
    .syncZero(SyncZero(resource: "vm1", offset: 1 << 21, length: 65536)),
    .syncCompared(SyncCompared(resource: "vm1", offset: 1 << 20, count: 2)),
    .ping(.max),
    .pong(42),
    .logPosition(resource: "vm1"),
]

/// A random message of any type, with fields of random (sometimes empty, sometimes multibyte) content.
func randomMessage(using g: inout SplitMix64) -> PeerMessage {
    func integer<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        // Edge values often: they are where byte order and width mistakes show.
        switch Int.random(in: 0..<4, using: &g) {
        case 0: return 0
        case 1: return .max
        default: return T.random(in: .min ... .max, using: &g)
        }
    }
    func text() -> String {
        let alphabet: [Character] = ["a", "Z", "0", "-", ".", " ", "é", "ß", "€", "日", "🚀", "\u{0}"]
        let count = Int.random(in: 0...(Int.random(in: 0..<20, using: &g) == 0 ? 1000 : 24), using: &g)
        return String((0..<count).map { _ in alphabet.randomElement(using: &g)! })
    }
    func blob(_ count: Int? = nil) -> [UInt8] {
        let count = count ?? Int.random(in: 0...(Int.random(in: 0..<20, using: &g) == 0 ? 100_000 : 64), using: &g)
        return (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &g) }
    }
    switch Int.random(in: 1...20, using: &g) {
    case 1: return .hello(PeerHello(version: integer(), cluster: text(), host: text(), hostID: text(), nonce: blob(32)))
    case 2: return .challenge(PeerChallenge(version: integer(), host: text(), hostID: text(), nonce: blob(32), proof: blob(32)))
    case 3: return .authenticate(proof: blob(32))
    case 4: return .welcome
    case 5: return .refused(reason: text())
    case 6: return .gossip(entries: blob())
    case 7: return .fetch(FetchRequest(resource: text(), segment: text(), offset: integer(), window: integer(), epoch: integer()))
    case 8: return .segmentData(SegmentData(resource: text(), segment: text(), offset: integer(), bytes: blob()))
    case 9: return .segmentEnd(SegmentEnd(resource: text(), segment: text(), size: integer(), next: text()))
    case 10: return .fetchAck(FetchAck(resource: text(), segment: text(), offset: integer()))
    case 11: return .fetchError(FetchError(resource: text(), code: integer(), reason: text()))
    case 12: return .syncBegin(resource: text())
    case 13:
        return .syncPosition(
            SyncPosition(resource: text(), size: integer(), lsn: integer(), segment: text(), segmentFirstLSN: integer(), epoch: integer())
        )
    case 14:
        let count = Int.random(in: 0...(Int.random(in: 0..<10, using: &g) == 0 ? 1024 : 8), using: &g)
        return .syncCompare(
            SyncCompare(resource: text(), offset: integer(), chunkSize: integer(), digests: (0..<count).map { _ in blob(16) })
        )
    case 15: return .syncData(SyncData(resource: text(), offset: integer(), bytes: blob()))
    case 16: return .syncZero(SyncZero(resource: text(), offset: integer(), length: integer()))
    case 17: return .syncCompared(SyncCompared(resource: text(), offset: integer(), count: integer()))
    case 18: return .ping(integer())
    case 19: return .pong(integer())
    default: return .logPosition(resource: text())
    }
}

/// The body of a frame (without its length prefix).
func body(of message: PeerMessage) -> [UInt8] {
    Array(message.encodedFrame().dropFirst(4))
}

/// A frame around an arbitrary body, for malformed input.
func frame(body: [UInt8]) -> [UInt8] {
    withUnsafeBytes(of: UInt32(body.count).littleEndian, Array.init) + body
}

/// Every message the decoder yields until it needs more bytes.
func drain(_ decoder: inout PeerFrameDecoder) throws -> [PeerMessage] {
    var messages: [PeerMessage] = []
    while let message = try decoder.next() { messages.append(message) }
    return messages
}

/// Why decoding this body fails, or nil if it decodes.
func decodeFailure(_ body: [UInt8]) -> String? {
    do {
        _ = try PeerMessage.decode(body: body)
        return nil
    } catch {
        return error.reason
    }
}
