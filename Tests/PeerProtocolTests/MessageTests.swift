import NIOCore
import PeerProtocol
import TestSupport
import Testing

@Suite("Peer messages and frames")
struct MessageTests {
    @Test func everyTypeHasItsByte() {
        #expect(sampleMessages.map(\.typeByte) == Array(1...20))
        for message in sampleMessages {
            let frame = message.encodedFrame()
            let length = frame[0..<4].reversed().reduce(0) { $0 << 8 | Int($1) }
            #expect(length == frame.count - 4)
            #expect(frame[4] == message.typeByte)
        }
    }

    @Test func samplesRoundTrip() throws {
        for message in sampleMessages {
            #expect(try PeerMessage.decode(body: body(of: message)) == message)
        }
    }

    /// Exact bytes of one message, so the layout in docs/peer-protocol.md is pinned.
    @Test func fetchLayout() {
        let frame = PeerMessage.fetch(FetchRequest(resource: "r", segment: "s1", offset: 0x0102, window: 3, epoch: 0x0405)).encodedFrame()
        let expected: [UInt8] =
            [32, 0, 0, 0, 7]
            + [1, 0, UInt8(ascii: "r")] + [2, 0, UInt8(ascii: "s"), UInt8(ascii: "1")]
            + [0x02, 0x01, 0, 0, 0, 0, 0, 0] + [3, 0, 0, 0, 0, 0, 0, 0] + [0x05, 0x04, 0, 0, 0, 0, 0, 0]
        #expect(frame == expected)
    }

    /// A version 1 fetch (no epoch) is a truncated version 2 one: refused, never read as epoch 0.
    @Test func aFetchWithoutEpochIsRefused() {
        let full = body(of: .fetch(FetchRequest(resource: "r", segment: "s1", offset: 1, window: 3, epoch: 4)))
        #expect(decodeFailure(Array(full.dropLast(8))) == "message 'fetch' truncated in field 'epoch'")
        #expect(decodeFailure(Array(full.dropLast(3))) == "message 'fetch' truncated in field 'epoch'")
    }

    /// `staleSource` is code 6 on the wire; codes this host does not know decode with their raw
    /// value kept (a newer peer's code is no protocol error), and a short code field is.
    @Test func staleSourceAndUnknownCodes() throws {
        let stale = PeerMessage.fetchError(FetchError(resource: "vm1", code: .staleSource, reason: "at epoch 3"))
        #expect(body(of: stale)[1 + 2 + 3 ..< 1 + 2 + 3 + 2] == [6, 0])
        guard case .fetchError(let decoded) = try PeerMessage.decode(body: body(of: stale)) else {
            Issue.record("not a fetchError")
            return
        }
        #expect(decoded.errorCode == .staleSource && decoded.code == 6)
        for code: UInt16 in [0, 7, 0xFFFF] {
            guard case .fetchError(let unknown) = try PeerMessage.decode(body: body(of: .fetchError(FetchError(resource: "vm1", code: code, reason: "?")))) else {
                Issue.record("not a fetchError")
                return
            }
            #expect(unknown.code == code && unknown.errorCode == nil)
        }
        #expect(decodeFailure([11, 1, 0, UInt8(ascii: "r"), 6]) == "message 'fetchError' truncated in field 'code'")
    }

    @Test func encodeFrameAppends() throws {
        var out = ByteBuffer(bytes: [0xAA])
        PeerMessage.ping(1).encodeFrame(into: &out)
        PeerMessage.welcome.encodeFrame(into: &out)
        #expect(out.readInteger(as: UInt8.self) == 0xAA)
        var decoder = PeerFrameDecoder()
        decoder.append(out)
        #expect(try drain(&decoder) == [.ping(1), .welcome])
    }

    /// A frame written as its head and then its payload (how links send bulk bytes) is the frame.
    @Test func payloadLeftOutIsWrittenAfterTheHead() throws {
        let bulk = sampleMessages.filter { $0.payload != nil }
        #expect(bulk.map(\.name) == ["segmentData", "syncData"])
        for message in bulk {
            var head = ByteBuffer()
            message.encodeFrame(into: &head, leavingOutPayload: true)
            #expect(head.readableBytes == message.encodedFrame().count - message.payload!.readableBytes)
            head.writeImmutableBuffer(message.payload!)
            #expect(Array(head.readableBytesView) == message.encodedFrame())
        }
    }

    /// Bulk bytes are slices of what was received: later input must not change a message taken before it.
    @Test func payloadsSurviveLaterInput() throws {
        let first = PeerMessage.syncData(SyncData(resource: "vm1", offset: 0, bytes: bytes(70_000, 1)))
        let second = PeerMessage.segmentData(SegmentData(resource: "vm1", segment: "s", offset: 9, bytes: bytes(70_000, 2)))
        let stream = first.encodedFrame() + second.encodedFrame()
        var decoder = PeerFrameDecoder()
        // The first frame and half of the second in one buffer, the rest in pieces.
        let cut = first.encodedFrame().count + 35_000
        decoder.append(ByteBuffer(bytes: stream[..<cut]))
        let taken = try decoder.next()
        #expect(taken == first)
        var position = cut
        while position < stream.count {
            let end = min(stream.count, position + 4096)
            decoder.append(ByteBuffer(bytes: stream[position..<end]))
            position = end
        }
        #expect(try decoder.next() == second)
        #expect(taken == first)
    }

    @Test func randomMessagesRoundTrip() throws {
        var g = seededGenerator()
        var stream = ByteBuffer()
        var sent: [PeerMessage] = []
        for _ in 0..<2000 {
            let message = randomMessage(using: &g)
            #expect(try PeerMessage.decode(body: body(of: message)) == message)
            message.encodeFrame(into: &stream)
            sent.append(message)
        }
        // The same stream through the streaming decoder, in random chunks that share its storage
        // (as a socket's reads share theirs with the messages taken from them).
        var decoder = PeerFrameDecoder()
        var received: [PeerMessage] = []
        var position = 0
        while position < stream.readableBytes {
            let end = min(stream.readableBytes, position + Int.random(in: 1...70_000, using: &g))
            decoder.append(stream.getSlice(at: position, length: end - position)!)
            position = end
            received += try drain(&decoder)
        }
        #expect(received == sent)
        #expect(decoder.bufferedByteCount == 0)
    }

    @Test func framesSplitAtEveryByte() throws {
        let stream = sampleMessages.flatMap { $0.encodedFrame() }
        for split in 0...stream.count {
            var decoder = PeerFrameDecoder()
            decoder.append(stream[..<split])
            var received = try drain(&decoder)
            decoder.append(stream[split...])
            received += try drain(&decoder)
            #expect(received == sampleMessages, "split at \(split)")
            #expect(decoder.bufferedByteCount == 0)
        }
    }

    @Test func framesByteByByte() throws {
        let stream = sampleMessages.flatMap { $0.encodedFrame() }
        var decoder = PeerFrameDecoder()
        var received: [PeerMessage] = []
        for byte in stream {
            decoder.append(CollectionOfOne(byte))
            received += try drain(&decoder)
            #expect(decoder.bufferedByteCount < 4 + PeerWire.maxFrameBody)
        }
        #expect(received == sampleMessages)
    }

    /// Unconsumed bytes are all the decoder keeps: the buffer does not grow with the stream.
    @Test func bufferHoldsOnlyUnconsumedBytes() throws {
        let frame = PeerMessage.syncData(SyncData(resource: "vm1", offset: 0, bytes: bytes(1000, 0))).encodedFrame()
        var decoder = PeerFrameDecoder()
        for _ in 0..<1000 {
            decoder.append(frame[..<500])
            #expect(try decoder.next() == nil)
            #expect(decoder.bufferedByteCount == 500)
            decoder.append(frame[500...])
            #expect(try decoder.next() != nil)
            #expect(decoder.bufferedByteCount == 0)
        }
    }

    @Test func tooLongStringIsCutAtACharacter() throws {
        let reason = String(repeating: "é", count: 3000)  // 6000 bytes
        guard case .refused(let decoded) = try PeerMessage.decode(body: body(of: .refused(reason: reason))) else {
            Issue.record("not a refusal")
            return
        }
        #expect(decoded.utf8.count == PeerWire.maxStringBytes)
        #expect(reason.hasPrefix(decoded))
        let odd = "x" + reason  // the limit falls in the middle of an "é"
        guard case .refused(let cut) = try PeerMessage.decode(body: body(of: .refused(reason: odd))) else { return }
        #expect(cut.utf8.count == PeerWire.maxStringBytes - 1)
        #expect(odd.hasPrefix(cut))
    }

    @Test func fetchErrorCodes() throws {
        let known = FetchError(resource: "vm1", code: .notPrimary, reason: "beta is primary")
        #expect(known.code == 3 && known.errorCode == .notPrimary)
        let future = FetchError(resource: "vm1", code: 77, reason: "?")
        #expect(future.errorCode == nil)
        #expect(try PeerMessage.decode(body: body(of: .fetchError(future))) == .fetchError(future))
    }
}

@Suite("Malformed peer frames")
struct MalformedTests {
    @Test func oversizeLengthRejectedBeforeTheBody() {
        var decoder = PeerFrameDecoder()
        decoder.append([0x40, 0x4B, 0x4C])  // 5_000_000 = 0x4C4B40, 3 of 4 length bytes
        #expect(throws: Never.self) { try decoder.next() }
        decoder.append([0x00])
        #expect(throws: PeerProtocolError("frame of 5000000 bytes exceeds the 4194304-byte limit")) { try decoder.next() }
        // The stream cannot be resynchronized, so it stays failed.
        decoder.append(PeerMessage.ping(1).encodedFrame())
        #expect(throws: PeerProtocolError.self) { try decoder.next() }
    }

    @Test func maximumLengthWaitsForTheBody() throws {
        var decoder = PeerFrameDecoder()
        decoder.append(withUnsafeBytes(of: UInt32(PeerWire.maxFrameBody).littleEndian, Array.init))
        #expect(try decoder.next() == nil)
        var largest = PeerMessage.gossip(entries: bytes(PeerWire.maxFrameBody - 5, 0)).encodedFrame()
        #expect(largest.count == 4 + PeerWire.maxFrameBody)
        decoder = PeerFrameDecoder()
        decoder.append(largest)
        #expect(try decoder.next() != nil)
        largest = PeerMessage.gossip(entries: bytes(PeerWire.maxFrameBody - 4, 0)).encodedFrame()
        decoder = PeerFrameDecoder()
        decoder.append(largest[..<4])
        #expect(throws: PeerProtocolError.self) { try decoder.next() }
    }

    @Test func emptyBody() {
        var decoder = PeerFrameDecoder()
        decoder.append([0, 0, 0, 0])
        #expect(throws: PeerProtocolError("empty frame body (no message type)")) { try decoder.next() }
        #expect(decodeFailure([]) == "empty frame body (no message type)")
    }

    @Test(arguments: [0, 21, 99, 255] as [UInt8])
    func unknownType(_ type: UInt8) {
        #expect(decodeFailure([type, 1, 2, 3]) == "unknown message type \(type)")
        var decoder = PeerFrameDecoder()
        decoder.append(frame(body: [type]))
        #expect(throws: PeerProtocolError("unknown message type \(type)")) { try decoder.next() }
    }

    @Test func truncationAtEveryByte() {
        for message in sampleMessages {
            let full = body(of: message)
            for cut in 1..<full.count {
                let failure = decodeFailure(Array(full[..<cut]))
                #expect(failure?.hasPrefix("message '\(message.name)' truncated") == true, "\(message.name) cut at \(cut): \(failure ?? "decoded")")
                // A frame whose length covers only part of the message fails the same way.
                var decoder = PeerFrameDecoder()
                decoder.append(frame(body: Array(full[..<cut])))
                #expect(throws: PeerProtocolError.self) { try decoder.next() }
            }
        }
        #expect(decodeFailure([7]) == "message 'fetch' truncated in field 'resource'")
    }

    @Test func trailingByte() {
        for message in sampleMessages {
            #expect(decodeFailure(body(of: message) + [0]) == "message '\(message.name)' has 1 trailing bytes")
        }
    }

    @Test func badUTF8() {
        var hello = body(of: .hello(PeerHello(version: 1, cluster: "ab", host: "h", hostID: "i", nonce: bytes(32, 0))))
        hello[3 + 2] = 0xFF  // after type, version, cluster length: the first byte of "ab"
        #expect(decodeFailure(hello) == "message 'hello' field 'cluster' is not valid UTF-8")
        let overlong: [UInt8] = [5, 2, 0, 0xC0, 0xAF]  // an overlong "/" in a refusal
        #expect(decodeFailure(overlong) == "message 'refused' field 'reason' is not valid UTF-8")
        let surrogate: [UInt8] = [12, 3, 0, 0xED, 0xA0, 0x80]
        #expect(decodeFailure(surrogate) == "message 'syncBegin' field 'resource' is not valid UTF-8")
    }

    @Test func stringOverTheLimit() {
        let length = PeerWire.maxStringBytes + 1
        let body: [UInt8] = [5, UInt8(length & 0xFF), UInt8(length >> 8)] + Array(repeating: UInt8(ascii: "x"), count: length)
        #expect(decodeFailure(body) == "message 'refused' field 'reason' is 4097 bytes, more than the 4096-byte limit for strings")
    }

    @Test(arguments: [0, 31, 33, 64])
    func wrongNonceAndProofLengths(_ count: Int) {
        let hello = PeerMessage.hello(PeerHello(version: 1, cluster: "c", host: "h", hostID: "i", nonce: bytes(count, 0)))
        #expect(decodeFailure(body(of: hello)) == "message 'hello' field 'nonce' is \(count) bytes, not 32")
        let badNonce = PeerMessage.challenge(PeerChallenge(version: 1, host: "h", hostID: "i", nonce: bytes(count, 0), proof: bytes(32, 0)))
        #expect(decodeFailure(body(of: badNonce)) == "message 'challenge' field 'nonce' is \(count) bytes, not 32")
        let badProof = PeerMessage.challenge(PeerChallenge(version: 1, host: "h", hostID: "i", nonce: bytes(32, 0), proof: bytes(count, 0)))
        #expect(decodeFailure(body(of: badProof)) == "message 'challenge' field 'proof' is \(count) bytes, not 32")
        #expect(decodeFailure(body(of: .authenticate(proof: bytes(count, 0)))) == "message 'authenticate' field 'proof' is \(count) bytes, not 32")
    }

    @Test(arguments: [0, 15, 17, 32])
    func wrongDigestLength(_ count: Int) {
        let compare = PeerMessage.syncCompare(
            SyncCompare(resource: "vm1", offset: 0, chunkSize: 4096, digests: [bytes(16, 0), bytes(count, 0)])
        )
        #expect(decodeFailure(body(of: compare)) == "message 'syncCompare' field 'digests' is \(count) bytes, not 16")
    }

    @Test func digestCountLimit() throws {
        let limit = PeerMessage.syncCompare(
            SyncCompare(resource: "vm1", offset: 0, chunkSize: 4096, digests: Array(repeating: bytes(16, 0), count: 1024))
        )
        #expect(try PeerMessage.decode(body: body(of: limit)) == limit)
        let over = PeerMessage.syncCompare(
            SyncCompare(resource: "vm1", offset: 0, chunkSize: 4096, digests: Array(repeating: bytes(16, 0), count: 1025))
        )
        #expect(decodeFailure(body(of: over)) == "message 'syncCompare' has 1025 digests, more than the limit of 1024")
        // A huge count is refused before anything is allocated for it.
        let huge: [UInt8] = [14, 0, 0] + Array(repeating: 0, count: 12) + [0xFF, 0xFF, 0xFF, 0xFF]
        #expect(decodeFailure(huge) == "message 'syncCompare' has 4294967295 digests, more than the limit of 1024")
    }

    @Test func blobLongerThanTheBody() {
        let body: [UInt8] = [6, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2]
        #expect(decodeFailure(body) == "message 'gossip' truncated in field 'entries'")
    }
}
