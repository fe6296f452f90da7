import NIOCore
import Synchronization
import TestSupport
import Testing

@testable import NBDProtocol

@Suite("Request parsing and validation")
struct RequestTests {
    let plain = RequestParser(session: NegotiatedSession(export: disk, structuredReplies: false, allocationContextID: nil))
    let structured = RequestParser(session: NegotiatedSession(export: disk, structuredReplies: true, allocationContextID: 1))
    let readOnly = RequestParser(session: NegotiatedSession(export: backup, structuredReplies: false, allocationContextID: nil))

    private func error(_ parser: RequestParser, _ bytes: ByteBuffer) -> NBDError? {
        var bytes = bytes
        if case .reject(_, _, let error, _) = parser.parse(&bytes) { return error }
        return nil
    }

    /// A valid READ parses into a request and consumes exactly its header.
    @Test func validRead() {
        var input = request(NBDCommand.read.rawValue, cookie: 99, offset: 4096, length: 512)
        input.writeBytes([0xFF])
        guard case .request(let r) = plain.parse(&input) else { Issue.record("expected request"); return }
        #expect(r.command == .read && r.cookie == 99 && r.offset == 4096 && r.length == 512 && r.payload == nil)
        #expect(input.readableBytes == 1)
    }

    /// A WRITE is returned only with its whole payload.
    @Test func writeWaitsForPayload() {
        var input = request(NBDCommand.write.rawValue, length: 8, payload: [1, 2, 3])
        #expect(plain.parse(&input) == .needMoreData)
        input.writeBytes([4, 5, 6, 7, 8])
        guard case .request(let r) = plain.parse(&input) else { Issue.record("expected request"); return }
        #expect(Array(r.payload!.readableBytesView) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(input.readableBytes == 0)
    }

    /// A partial header waits.
    @Test func partialHeaderWaits() {
        var input = request(NBDCommand.read.rawValue)
        var part = input.readSlice(length: 16)!
        #expect(plain.parse(&part) == .needMoreData)
    }

    /// Bad request magic: no cookie to answer, close.
    @Test func badMagicCloses() {
        var input = request(NBDCommand.read.rawValue, magic: 0x1234_5678)
        guard case .close = plain.parse(&input) else { Issue.record("expected close"); return }
    }

    /// A WRITE header claiming more than the maximum payload is answered, then the connection closes.
    @Test func oversizedWriteClosesAfterError() {
        var input = request(NBDCommand.write.rawValue, length: 0xFFFF_FFF0)
        guard case .rejectAndClose(_, _, .invalid, _) = plain.parse(&input) else { Issue.record("expected rejectAndClose"); return }
    }

    @Test func unknownCommand() { #expect(error(plain, request(0x55)) == .invalid) }
    @Test func unknownFlag() { #expect(error(plain, request(0, flags: NBDCommandFlags(rawValue: 0x4000))) == .invalid) }
    @Test func noHoleOnRead() { #expect(error(plain, request(0, flags: .noHole)) == .invalid) }
    @Test func dfWithoutStructured() { #expect(error(plain, request(0, flags: .doNotFragment)) == .invalid) }
    @Test func dfWithStructured() { #expect(error(structured, request(0, flags: .doNotFragment)) == nil) }
    @Test func reqOneOnRead() { #expect(error(plain, request(0, flags: .requestOne)) == .invalid) }
    @Test func fastZeroOnWrite() {
        #expect(error(plain, request(1, flags: .fastZero, length: 4, payload: [0, 0, 0, 0])) == .invalid)
    }
    /// FUA is accepted on every command once advertised.
    @Test func fuaOnRead() { #expect(error(plain, request(0, flags: .fua)) == nil) }

    /// Writes to a read-only export are EPERM; the payload is consumed.
    @Test func writeToReadOnly() {
        var input = request(NBDCommand.write.rawValue, length: 4, payload: [1, 2, 3, 4])
        guard case .reject(_, _, .permission, _) = readOnly.parse(&input) else { Issue.record("expected EPERM"); return }
        #expect(input.readableBytes == 0)
        #expect(error(readOnly, request(NBDCommand.trim.rawValue)) == .permission)
    }

    /// Zero-length data commands are EINVAL.
    @Test(arguments: [NBDCommand.read, .trim, .writeZeroes, .cache, .blockStatus])
    func zeroLength(command: NBDCommand) {
        #expect(error(structured, request(command.rawValue, length: 0)) == .invalid)
    }

    @Test func zeroLengthWrite() { #expect(error(plain, request(1, length: 0, payload: [])) == .invalid) }

    /// Past the end: writes get ENOSPC (payload consumed), everything else EINVAL.
    @Test func beyondEnd() {
        let end = disk.size
        #expect(error(plain, request(0, offset: end, length: 512)) == .invalid)
        #expect(error(plain, request(4, offset: end - 256, length: 512)) == .invalid)
        #expect(error(plain, request(6, offset: end, length: 512)) == .noSpace)
        var write = request(1, offset: end - 2, length: 4, payload: [1, 2, 3, 4])
        guard case .reject(_, _, .noSpace, _) = plain.parse(&write) else { Issue.record("expected ENOSPC"); return }
        #expect(write.readableBytes == 0)
        #expect(error(structured, request(7, offset: end, length: 1)) == .invalid)
    }

    /// A connection's requests are checked against the export's size as it is now: after a resize
    /// the new end is usable without a new handshake, and after a forced shrink the old end is not.
    @Test func theEndFollowsAResize() {
        let size = Mutex(disk.size)
        let parser = RequestParser(session: NegotiatedSession(export: disk, structuredReplies: false, allocationContextID: nil)) {
            size.withLock { $0 }
        }
        #expect(error(parser, request(0, offset: disk.size, length: 512)) == .invalid)
        size.withLock { $0 = disk.size * 2 }
        #expect(error(parser, request(0, offset: disk.size, length: 512)) == nil)
        var write = request(1, offset: disk.size * 2 - 4, length: 4, payload: [1, 2, 3, 4])
        guard case .request = parser.parse(&write) else { Issue.record("expected the write beyond the old end to be accepted"); return }
        size.withLock { $0 = disk.size / 2 }
        #expect(error(parser, request(1, offset: disk.size / 2, length: 4, payload: [1, 2, 3, 4])) == .noSpace)
    }

    /// offset + length overflowing 2^64 is out of range, never wrapped.
    @Test func offsetOverflow() {
        #expect(error(plain, request(0, offset: UInt64.max - 0xFFF, length: 0x2000)) == .invalid)
        #expect(error(plain, request(1, offset: UInt64.max - 1, length: 4, payload: [0, 0, 0, 0])) == .noSpace)
    }

    /// READ beyond the largest accepted payload is EINVAL (the reply could not be buffered); READs
    /// beyond the advertised maximum but within the accepted one are served.
    @Test func oversizedRead() {
        let big = RequestParser(session: NegotiatedSession(
            export: ExportDescriptor(name: "big", description: "", size: 1 << 40, readOnly: false),
            structuredReplies: false, allocationContextID: nil))
        #expect(NBDLimits.advertisedMaxPayload < NBDLimits.acceptedMaxPayload)
        #expect(error(big, request(0, length: NBDLimits.acceptedMaxPayload + 1)) == .invalid)
        #expect(error(big, request(0, length: NBDLimits.acceptedMaxPayload)) == nil)
        #expect(error(big, request(0, length: NBDLimits.advertisedMaxPayload + 1)) == nil)
        #expect(error(big, request(0, length: 50 << 20)) == nil)
        // TRIM and WRITE_ZEROES carry no payload and may be larger.
        #expect(error(big, request(4, length: UInt32.max)) == nil)
    }

    /// BLOCK_STATUS needs structured replies and a selected context.
    @Test func blockStatusNeedsContext() {
        #expect(error(plain, request(7)) == .invalid)
        #expect(error(structured, request(7)) == nil)
    }

    /// FLUSH and DISC must carry offset 0 and length 0.
    @Test func flushWithRange() {
        #expect(error(plain, request(3, offset: 4096, length: 4096)) == .invalid)
        #expect(error(plain, request(3, length: 0)) == nil)
    }

    /// Random headers (valid magic or not, every command, flag and range, payloads complete or cut
    /// short), parsed as a connection would: each outcome consumes exactly what the framing says
    /// (a whole header plus a WRITE's payload, nothing for needMoreData and close), answers with the
    /// request's own cookie, accepts only requests that lie within the export with known flags,
    /// and never loops without progress. Seeded: MARS_TEST_SEED replays a failure.
    @Test func randomInputIsFramedAndValidated() {
        let seed = TestSeed.make("randomInputIsFramedAndValidated")
        var generator = SplitMix64(state: seed)
        for parser in [plain, structured, readOnly] {
            for round in 0..<2000 {
                var bytes = ByteBuffer()
                let requests = Int.random(in: 1...4, using: &generator)
                for _ in 0..<requests {
                    let command = UInt16.random(in: 0...10, using: &generator)
                    let length: UInt32 = Bool.random(using: &generator) ? UInt32.random(in: 0...9000, using: &generator) : .random(in: 0...UInt32.max, using: &generator)
                    let size = parser.session.export.size
                    let offset: UInt64 =
                        switch Int.random(in: 0..<3, using: &generator) {
                        case 0: UInt64.random(in: (size - min(size, 9000))...(size + 100), using: &generator)  // around the end
                        case 1: UInt64.random(in: 0...(2 << 20), using: &generator)
                        default: UInt64.random(in: 0...UInt64.max, using: &generator)
                        }
                    bytes.writeInteger(UInt32.random(in: 0...9, using: &generator) == 0 ? UInt32.random(in: 0...UInt32.max, using: &generator) : NBDMagic.request)
                    let flags: UInt16 =
                        switch Int.random(in: 0..<8, using: &generator) {
                        case 0..<4: 0
                        case 4..<7: UInt16.random(in: 0...0x1F, using: &generator)
                        default: UInt16.random(in: 0...UInt16.max, using: &generator)
                        }
                    bytes.writeInteger(flags)
                    bytes.writeInteger(command)
                    bytes.writeInteger(UInt64.random(in: 0...UInt64.max, using: &generator))
                    bytes.writeInteger(offset)
                    bytes.writeInteger(length)
                    if command == NBDCommand.write.rawValue, length <= 9000 {
                        let sent = Bool.random(using: &generator) ? Int(length) : Int.random(in: 0...Int(length), using: &generator)
                        bytes.writeRepeatingByte(0xA5, count: sent)
                    }
                }
                // Cut the input anywhere, as a socket read may.
                if Int.random(in: 0..<4, using: &generator) == 0 {
                    bytes.moveWriterIndex(to: Int.random(in: 0...bytes.writerIndex, using: &generator))
                }
                var steps = 0
                parsing: while steps < 10 {
                    steps += 1
                    let before = bytes
                    let header = before.readableBytes >= RequestHeader.size ? headerFields(before) : nil
                    let outcome = parser.parse(&bytes)
                    let consumed = bytes.readerIndex - before.readerIndex
                    let context = "seed \(seed), round \(round), \(outcome)"
                    switch outcome {
                    case .needMoreData:
                        #expect(consumed == 0, "\(context)")
                        if let header {
                            #expect(header.magic == NBDMagic.request && header.type == NBDCommand.write.rawValue
                                && before.readableBytes < RequestHeader.size + Int(header.length), "\(context)")
                        }
                        break parsing
                    case .close:
                        #expect(consumed == 0 && header != nil && header!.magic != NBDMagic.request, "\(context)")
                        break parsing
                    case .request(let request):
                        let header = header!
                        let payload = request.command == .write ? Int(request.length) : 0
                        #expect(consumed == RequestHeader.size + payload, "\(context)")
                        #expect(request.cookie == header.cookie && request.offset == header.offset, "\(context)")
                        #expect(request.offset.addingReportingOverflow(UInt64(request.length)).partialValue <= parser.session.export.size, "\(context)")
                        #expect(!(parser.session.export.readOnly && [.write, .trim, .writeZeroes].contains(request.command)), "\(context)")
                        #expect(NBDCommandFlags(rawValue: header.flags).subtracting([.fua, .noHole, .doNotFragment, .requestOne, .fastZero]).isEmpty, "\(context)")
                    case .reject(let cookie, _, _, _):
                        let header = header!
                        let payload = header.type == NBDCommand.write.rawValue ? Int(header.length) : 0
                        #expect(consumed == RequestHeader.size + payload && cookie == header.cookie, "\(context)")
                    case .rejectAndClose(let cookie, _, _, _):
                        #expect(consumed == RequestHeader.size && cookie == header!.cookie && header!.length > NBDLimits.acceptedMaxPayload, "\(context)")
                        break parsing
                    case .writeHeader:
                        Issue.record("gathering is off in these parsers: \(context)")
                        break parsing
                    }
                }
                #expect(steps <= 5, "no progress: seed \(seed), round \(round)")
            }
        }
    }

    private func headerFields(_ buffer: ByteBuffer) -> (magic: UInt32, flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        let at = buffer.readerIndex
        return (
            buffer.getInteger(at: at, as: UInt32.self)!, buffer.getInteger(at: at + 4, as: UInt16.self)!,
            buffer.getInteger(at: at + 6, as: UInt16.self)!, buffer.getInteger(at: at + 8, as: UInt64.self)!,
            buffer.getInteger(at: at + 16, as: UInt64.self)!, buffer.getInteger(at: at + 24, as: UInt32.self)!
        )
    }
}

@Suite("Reply encoding and error mapping")
struct ReplyTests {
    /// A simple reply is magic, error, cookie.
    @Test func simpleReply() {
        var out = ByteBuffer()
        ReplyEncoder.writeSimple(&out, cookie: 0x0102, error: .noSpace)
        #expect(out.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
        #expect(out.readInteger(as: UInt32.self) == 28)
        #expect(out.readInteger(as: UInt64.self) == 0x0102)
    }

    /// A structured READ header is one OFFSET_DATA chunk marked DONE, length covering offset and data.
    @Test func structuredReadHeader() {
        var out = ByteBuffer()
        ReplyEncoder.writeReadHeader(&out, structured: true, cookie: 5, offset: 4096, length: 512)
        #expect(out.readableBytes == ReplyEncoder.readHeaderSize(structured: true))
        #expect(out.readInteger(as: UInt32.self) == NBDMagic.structuredReply)
        #expect(out.readInteger(as: UInt16.self) == NBDReplyFlag.done)
        #expect(out.readInteger(as: UInt16.self) == NBDChunkType.offsetData.rawValue)
        #expect(out.readInteger(as: UInt64.self) == 5)
        #expect(out.readInteger(as: UInt32.self) == 520)  // offset (8) + data (512)
        #expect(out.readInteger(as: UInt64.self) == 4096)
    }

    /// An error chunk carries the error and a message, and is the last chunk.
    @Test func errorChunk() {
        var out = ByteBuffer()
        ReplyEncoder.writeError(&out, structured: true, cookie: 1, error: .invalid, message: "bad")
        out.moveReaderIndex(forwardBy: 4)
        #expect(out.readInteger(as: UInt16.self) == NBDReplyFlag.done)
        #expect(out.readInteger(as: UInt16.self) == NBDChunkType.error.rawValue)
        out.moveReaderIndex(forwardBy: 8)
        #expect(out.readInteger(as: UInt32.self) == 9)
        #expect(out.readInteger(as: UInt32.self) == 22)
        #expect(out.readInteger(as: UInt16.self) == 3)
        #expect(out.readString(length: 3) == "bad")
    }

    /// BLOCK_STATUS: context id then (length, flags) pairs.
    @Test func blockStatusChunk() {
        var out = ByteBuffer()
        ReplyEncoder.writeBlockStatus(&out, cookie: 1, contextID: 1, extents: [Extent(length: 4096, flags: 3), Extent(length: 512, flags: 0)])
        out.moveReaderIndex(forwardBy: 16)
        #expect(out.readInteger(as: UInt32.self) == 20)  // context id (4) + two extents (16)
        #expect(out.readInteger(as: UInt32.self) == 1)
        #expect(out.readInteger(as: UInt32.self) == 4096)
        #expect(out.readInteger(as: UInt32.self) == 3)
    }

    /// One place maps errno to wire errors; ENOTSUP is only reported for FAST_ZERO.
    @Test func errnoMapping() {
        #expect(nbdError(errno: 28) == .noSpace)
        #expect(nbdError(errno: 122) == .noSpace)
        #expect(nbdError(errno: 30) == .permission)
        #expect(nbdError(errno: 5) == .io)
        #expect(nbdError(errno: 95) == .invalid)
        #expect(nbdError(errno: 95, fastZeroRequested: true) == .notSupported)
        #expect(nbdError(errno: 9999) == .io)
    }
}

@Suite("Gathered WRITE payloads")
struct GatherTests {
    let parser = RequestParser(
        session: NegotiatedSession(export: disk, structuredReplies: false, allocationContextID: nil), gatherPayloadsFrom: 4096
    )

    /// A large WRITE whose payload has not fully arrived is handed over after its header.
    @Test func largeIncompleteWriteIsGathered() {
        var input = request(NBDCommand.write.rawValue, cookie: 5, offset: 8192, length: 65536, payload: [1, 2, 3])
        guard case .writeHeader(let header) = parser.parse(&input) else { Issue.record("expected writeHeader"); return }
        #expect(header.cookie == 5 && header.offset == 8192 && header.length == 65536)
        #expect(Array(input.readableBytesView) == [1, 2, 3])  // Payload bytes stay for the caller.
        guard case .request(let r) = parser.finishWrite(header) else { Issue.record("expected request"); return }
        #expect(r.command == .write && r.payload == nil && r.length == 65536)
    }

    /// Small writes and complete large writes are parsed whole, as before.
    @Test func smallOrCompleteWritesAreNotGathered() {
        var small = request(NBDCommand.write.rawValue, length: 512, payload: [0])
        #expect(parser.parse(&small) == .needMoreData)
        var complete = request(NBDCommand.write.rawValue, length: 4096, payload: [UInt8](repeating: 9, count: 4096))
        guard case .request(let r) = parser.parse(&complete) else { Issue.record("expected request"); return }
        #expect(r.payload?.readableBytes == 4096)
    }

    /// A gathered WRITE is validated when its payload is complete: past the end is ENOSPC.
    @Test func gatheredWriteIsValidated() {
        var input = request(NBDCommand.write.rawValue, offset: disk.size - 4096, length: 65536)
        guard case .writeHeader(let header) = parser.parse(&input) else { Issue.record("expected writeHeader"); return }
        guard case .reject(_, _, .noSpace, _) = parser.finishWrite(header) else { Issue.record("expected ENOSPC"); return }
    }

    /// Oversized WRITEs are still refused before any gathering.
    @Test func oversizedWriteIsNotGathered() {
        var input = request(NBDCommand.write.rawValue, length: NBDLimits.acceptedMaxPayload + 1)
        guard case .rejectAndClose(_, _, .invalid, let message) = parser.parse(&input) else { Issue.record("expected rejectAndClose"); return }
        #expect(message.contains("\(NBDLimits.acceptedMaxPayload)"), "\(message)")
    }

    /// WRITEs beyond the advertised maximum but within the accepted one are gathered and served.
    @Test func writeBeyondAdvertisedMaximumIsGathered() {
        let parser = RequestParser(
            session: NegotiatedSession(
                export: ExportDescriptor(name: "big", description: "", size: 1 << 40, readOnly: false),
                structuredReplies: false, allocationContextID: nil),
            gatherPayloadsFrom: 4096)
        for length in [NBDLimits.advertisedMaxPayload + 1, 50 << 20, NBDLimits.acceptedMaxPayload] {
            var input = request(NBDCommand.write.rawValue, length: length)
            guard case .writeHeader(let header) = parser.parse(&input) else { Issue.record("expected writeHeader for \(length)"); continue }
            guard case .request(let request) = parser.finishWrite(header) else { Issue.record("expected a request for \(length)"); continue }
            #expect(request.length == length)
        }
    }
}
