import BlockStore
import LogEngine
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import TestSupport
import Testing

@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// How a test's client reaches the server.
enum Transport: CaseIterable { case unix, tcp }

/// A running server on a temporary Unix socket (and with `.tcp`, on a free TCP port of 127.0.0.1)
/// over a sparse file, for one test.
final class ServerHarness {
    let transport: Transport
    let directory: String
    let socketPath: String
    let imagePath: String
    let group: MultiThreadedEventLoopGroup
    let server: NBDServer

    /// Opens a transaction log for the export's device (given the device and the test's directory).
    struct LogOpener {
        let open: (BlockDevice, String) throws -> LogEngine
    }

    /// With `log`, the export is a logged one.
    init(
        size: Int = 16 << 20, engine: IOEngine = .auto, cache: CacheMode = .buffered, transport: Transport = .unix,
        log: LogOpener? = nil, configure: (inout NBDServerConfiguration) -> Void = { _ in }
    ) async throws {
        self.transport = transport
        var template = Array("/var/tmp/marsd-srv-XXXXXX".utf8CString)
        directory = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        socketPath = "\(directory)/nbd.sock"
        imagePath = "\(directory)/disk.img"
        let fd = open(imagePath, O_CREAT | O_RDWR, 0o600)
        precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        close(fd)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let device = try BlockDevice(path: imagePath, cacheMode: cache)
        var configuration = NBDServerConfiguration()
        configuration.unixSocketPath = socketPath
        configuration.ioEngine = engine
        if transport == .tcp {
            configuration.tcpHost = "127.0.0.1"
            configuration.tcpPort = 0
        }
        configure(&configuration)
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let export = ServedExport(name: "disk", device: device, log: try log?.open(device, directory))
        server = try NBDServer(exports: ExportTable([export]), configuration: configuration, group: group, logger: logger)
        try await server.start()
    }

    func stop() async {
        await server.stop()
        try? await group.shutdownGracefully()
        _ = system("rm -rf '\(directory)'")
    }

    /// A client over the harness's transport, past the handshake.
    func connect(structured: Bool = false) throws -> TestClient {
        try transport == .tcp
            ? TestClient.connected(tcpPort: server.tcpPort!, structured: structured)
            : TestClient.connected(socketPath, structured: structured)
    }

    /// The server still completes a handshake and a read for a new client.
    func isServing() -> Bool {
        guard let client = try? TestClient.connected(socketPath) else { return false }
        return (try? client.read(512, at: 0)) != nil
    }
}

/// Sends `request` over and over without reading a reply, until the socket stays full (the server
/// stopped reading) or 100000 were taken (a server that reads without bound takes them all).
func floodUntilBlocked(_ client: TestClient, _ request: [UInt8]) async throws -> (blocked: Bool, accepted: Int) {
    _ = fcntl(client.fd, F_SETFL, fcntl(client.fd, F_GETFL) | O_NONBLOCK)
    var accepted = 0
    for _ in 0..<100_000 {
        let n = request.withUnsafeBytes { send(client.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n < 0 && errno == EAGAIN {
            try await Task.sleep(for: .milliseconds(20))
            let retry = request.withUnsafeBytes { send(client.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if retry < 0 && errno == EAGAIN { return (true, accepted) }
        } else {
            #expect(n == request.count)
        }
        accepted += 1
    }
    return (false, accepted)
}

func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
}

/// `count` bytes (a multiple of 8) from `random`: unlike `pattern`, no stretch repeats another.
func randomBytes(_ count: Int, _ random: inout SplitMix64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    bytes.withUnsafeMutableBytes { raw in
        for index in stride(from: 0, to: count, by: 8) { raw.storeBytes(of: random.next(), toByteOffset: index, as: UInt64.self) }
    }
    return bytes
}

@Suite("NBD server over real sockets", .serialized)
struct ServerTests {
    /// WRITE, FUA WRITE, FLUSH and READ round-trip on both engines and both cache modes.
    @Test(arguments: [
        (IOEngine.uring, CacheMode.buffered, PageCacheWritePolicy.inline), (.uring, .buffered, .engine),
        (.posix, .buffered, .engine), (.auto, .direct, .inline),
    ])
    func roundTrip(engine: IOEngine, cache: CacheMode, pageCacheWrites: PageCacheWritePolicy) async throws {
        if engine == .uring, (try? URingIOQueue()) == nil {
            print("SKIP roundTrip(\(engine), \(cache), \(pageCacheWrites)): io_uring is not available here")
            return
        }
        let harness = try await ServerHarness(engine: engine, cache: cache) { $0.pageCacheWrites = pageCacheWrites }
        let client = try TestClient.connected(harness.socketPath)
        let data = pattern(65536, seed: 3)
        #expect(try client.write(data, at: 4096) == 0)
        #expect(try client.write(Array(data[0..<512]), at: 512 * 3, flags: .fua) == 0)  // 512-byte granular
        #expect(try client.command(.flush) == 0)
        #expect(try client.read(65536, at: 4096) == data)
        #expect(try client.read(512, at: 512 * 3) == Array(data[0..<512]))
        #expect(try client.command(.writeZeroes, flags: .noHole, offset: 8192, length: 4096) == 0)
        #expect(try client.read(4096, at: 8192) == [UInt8](repeating: 0, count: 4096))
        #expect(try client.command(.trim, flags: .fua, offset: 16384, length: 4096) == 0)
        #expect(try client.command(.cache, offset: 0, length: 65536) == 0)
        await harness.stop()
    }

    /// CAN_MULTI_CONN: a write acknowledged on one connection and flushed on another is visible on a third.
    @Test func multiConnVisibility() async throws {
        let harness = try await ServerHarness()
        let a = try TestClient.connected(harness.socketPath)
        let b = try TestClient.connected(harness.socketPath)
        let c = try TestClient.connected(harness.socketPath)
        #expect(a.flags.contains(.canMultiConn))
        let data = pattern(4096, seed: 9)
        #expect(try a.write(data, at: 1 << 20) == 0)
        #expect(try b.command(.flush) == 0)
        #expect(try c.read(4096, at: 1 << 20) == data)
        await harness.stop()
    }

    /// A WRITE whose payload is cut short is never applied, and the server keeps serving.
    @Test func writePayloadCutShort() async throws {
        let harness = try await ServerHarness()
        let client = try TestClient.connected(harness.socketPath)
        try client.send(client.requestBytes(.write, offset: 0, length: 65536) + [UInt8](repeating: 0xEE, count: 1000))
        shutdown(client.fd, Int32(SHUT_WR))
        #expect(client.isClosedByServer())
        let fresh = try TestClient.connected(harness.socketPath)
        #expect(try fresh.read(1000, at: 0) == [UInt8](repeating: 0, count: 1000))
        await harness.stop()
    }

    /// Large WRITEs arriving in many pieces are gathered and written whole, in both cache modes;
    /// one cut short is never applied.
    @Test(arguments: CacheMode.allCases)
    func gatheredLargeWrites(cache: CacheMode) async throws {
        let harness = try await ServerHarness(size: 64 << 20, cache: cache)
        let client = try TestClient.connected(harness.socketPath)
        let data = pattern(1 << 20, seed: 11)
        let message = client.requestBytes(.write, flags: .fua, cookie: 9, offset: 3 << 20, length: UInt32(data.count)) + data
        var sent = 0
        while sent < message.count {
            let piece = min(50_000, message.count - sent)  // Pieces that split the payload at odd places.
            try client.send(Array(message[sent..<(sent + piece)]))
            sent += piece
            try await Task.sleep(for: .milliseconds(1))
        }
        #expect(try client.simpleReply() == (0, 9))
        #expect(try client.read(1 << 20, at: 3 << 20) == data)
        // Unaligned offset: exercises the buffered fallback in direct mode.
        #expect(try client.write(Array(data[0..<300_000]), at: 12_345) == 0)
        #expect(try client.read(300_000, at: 12_345) == Array(data[0..<300_000]))

        let cut = try TestClient.connected(harness.socketPath)
        try cut.send(cut.requestBytes(.write, offset: 8 << 20, length: 1 << 20) + Array(data[0..<700_000]))
        shutdown(cut.fd, Int32(SHUT_WR))
        #expect(cut.isClosedByServer())
        #expect(try client.read(1 << 20, at: 8 << 20) == [UInt8](repeating: 0, count: 1 << 20))
        await harness.stop()
    }

    /// A WRITE gathered from more received buffers than one writev takes (IOV_MAX, 1024) is
    /// copied into one buffer and written whole. 1 KiB receive buffers cut each 1.5 MiB payload into
    /// about 1500 pieces; the data is random so that a piece lost, doubled or moved shows. Written
    /// page-aligned (inline), FUA (through the engine) and unaligned, in both cache modes.
    @Test(arguments: CacheMode.allCases)
    func writeGatheredFromMoreBuffersThanIOVMax(cache: CacheMode) async throws {
        let harness = try await ServerHarness(size: 16 << 20, cache: cache) {
            $0.receiveBuffers = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 1024, maximum: 1024)
        }
        let client = try TestClient.connected(harness.socketPath)
        var random = SplitMix64(state: TestSeed.make("writeGatheredFromMoreBuffersThanIOVMax"))
        let length = 3 << 19
        let writes: [(offset: UInt64, flags: NBDCommandFlags)] = [(1 << 20, []), (4 << 20, .fua), ((8 << 20) + 12_345, [])]
        for write in writes {
            let data = randomBytes(length, &random)
            #expect(try client.write(data, at: write.offset, flags: write.flags) == 0, "WRITE at \(write.offset)")
            #expect(try client.read(length, at: write.offset) == data, "READ at \(write.offset)")
        }
        await harness.stop()
    }

    /// Large and small READs pipelined with a WRITE keep their replies' framing, simple and
    /// structured, over both transports, from the page cache and from the disk. The data is random
    /// so that a wrong range shows.
    @Test(arguments: Transport.allCases)
    func largeAndSmallReadsPipelined(transport: Transport) async throws {
        let harness = try await ServerHarness(size: 16 << 20, transport: transport)
        let client = try harness.connect()
        var random = SplitMix64(state: TestSeed.make("largeAndSmallReadsPipelined"))
        let model = randomBytes(8 << 20, &random)
        #expect(try client.write(model, at: 0) == 0)
        // Two large READs, a small one and a WRITE, all in flight together.
        let reads: [(cookie: UInt64, range: Range<Int>)] = [(1, 12_345..<(12_345 + (1 << 20))), (2, 0..<4096), (4, (5 << 20)..<((5 << 20) + (64 << 10)))]
        var burst: [UInt8] = []
        for read in reads {
            burst += client.requestBytes(.read, cookie: read.cookie, offset: UInt64(read.range.lowerBound), length: UInt32(read.range.count))
            if read.cookie == 2 { burst += client.requestBytes(.write, cookie: 3, offset: 9 << 20, length: 4096) + Array(model[0..<4096]) }
        }
        try client.send(burst)
        for _ in 0..<4 {
            let reply = try client.simpleReply()
            #expect(reply.error == 0)
            guard let read = reads.first(where: { $0.cookie == reply.cookie }) else {
                #expect(reply.cookie == 3)
                continue
            }
            #expect(try client.receive(read.range.count) == Array(model[read.range]), "READ \(read.cookie)")
        }
        // Structured: one OFFSET_DATA chunk, then the bytes.
        let structured = try harness.connect(structured: true)
        try structured.send(structured.requestBytes(.read, cookie: 7, offset: 1 << 20, length: 2 << 20))
        let chunk = try structured.receive(20)
        #expect(be32(chunk, 0) == NBDMagic.structuredReply && be16(chunk, 6) == NBDChunkType.offsetData.rawValue && be32(chunk, 16) == 8 + (2 << 20))
        #expect(be64(try structured.receive(8), 0) == 1 << 20)
        #expect(try structured.receive(2 << 20) == Array(model[(1 << 20)..<(3 << 20)]))
        // Out of the page cache: read from the disk.
        let fd = open(harness.imagePath, O_RDONLY)
        #expect(fd >= 0 && fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        close(fd)
        #expect(try client.read(3 << 20, at: 4 << 20) == Array(model[(4 << 20)..<(7 << 20)]))
        await harness.stop()
    }

    /// Requests beyond the advertised maximum (32 MiB) up to the accepted one (64 MiB) are served,
    /// as nbd-tester-client's integrityhuge trace sends them (33-50 MiB, no block sizes negotiated):
    /// a seeded trace of pipelined WRITEs, then READs, checked against a model of the export, over
    /// both transports and both cache modes. Beyond 64 MiB a READ is EINVAL and a WRITE closes.
    @Test(arguments: zip([Transport.tcp, .unix], [CacheMode.buffered, .direct]))
    func requestsBeyondTheAdvertisedMaximum(transport: Transport, cache: CacheMode) async throws {
        let size = 160 << 20
        let harness = try await ServerHarness(size: size, cache: cache, transport: transport)
        let client = try harness.connect()
        var random = SplitMix64(state: TestSeed.make("requestsBeyondTheAdvertisedMaximum"))
        var model = [UInt8](repeating: 0, count: size)
        // Two WRITEs in flight together, one in each half (so their order does not matter).
        let half = size / 2
        var ranges: [Range<Int>] = []
        for (cookie, base) in [0, half].enumerated() {
            let length = Int.random(in: (Int(NBDLimits.advertisedMaxPayload) + 1)...(50 << 20), using: &random)
            let alignment = [1, 512, 4096].randomElement(using: &random)!
            let offset = base + Int.random(in: 0...(half - length), using: &random) / alignment * alignment
            model.withUnsafeMutableBytes { bytes in
                for index in stride(from: offset, to: offset + length - 7, by: 8) {
                    bytes.storeBytes(of: random.next(), toByteOffset: index, as: UInt64.self)
                }
            }
            ranges.append(offset..<(offset + length))
            try client.send(client.requestBytes(.write, cookie: UInt64(cookie), offset: UInt64(offset), length: UInt32(length)))
            try client.send(Array(model[offset..<(offset + length)]))
        }
        let written = try [client.simpleReply(), client.simpleReply()]
        #expect(written.map(\.error) == [0, 0] && Set(written.map(\.cookie)) == [0, 1], "\(written)")
        // Both ranges and the largest accepted READ, in flight together.
        ranges.append(0..<Int(NBDLimits.acceptedMaxPayload))
        for (cookie, range) in ranges.enumerated() {
            try client.send(client.requestBytes(.read, cookie: UInt64(cookie), offset: UInt64(range.lowerBound), length: UInt32(range.count)))
        }
        for _ in ranges {
            let reply = try client.simpleReply()
            #expect(reply.error == 0)
            let range = ranges[Int(reply.cookie)]
            let data = try client.receive(range.count)
            let same = data.withUnsafeBytes { got in model.withUnsafeBytes { memcmp(got.baseAddress!, $0.baseAddress! + range.lowerBound, range.count) == 0 } }
            #expect(same, "READ of \(range.count) bytes at \(range.lowerBound)")
        }
        let tooLarge = NBDLimits.acceptedMaxPayload + 1
        try client.send(client.requestBytes(.read, cookie: 7, length: tooLarge))
        #expect(try client.simpleReply() == (UInt32(EINVAL), 7))
        #expect(try client.read(4096, at: 0) == Array(model[0..<4096]), "the connection goes on after the refused READ")
        try client.send(client.requestBytes(.write, cookie: 8, length: tooLarge))
        #expect(try client.simpleReply() == (UInt32(EINVAL), 8))
        #expect(client.isClosedByServer(), "a refused WRITE's payload cannot be skipped safely")
        await harness.stop()
    }

    /// Invariant 7: however many clients pipeline large requests, the payload a loop holds stays within
    /// its budget (plus at most one request), and every request still completes (no deadlock).
    @Test func loopBufferBudget() async throws {
        let budget = 1 << 20
        let harness = try await ServerHarness(size: 64 << 20) { $0.bufferBudgetPerLoop = budget }
        let data = pattern(512 << 10, seed: 4)
        let socketPath = harness.socketPath
        try await withThrowingTaskGroup(of: Void.self) { group in
            for connection in 0..<6 {
                group.addTask {
                    let client = try TestClient.connected(socketPath)
                    var writes: [UInt8] = []
                    var reads: [UInt8] = []
                    for i in 0..<8 {
                        let offset = UInt64(connection * 8 + i) * UInt64(data.count)
                        writes += client.requestBytes(.write, cookie: UInt64(i), offset: offset, length: UInt32(data.count)) + data
                        reads += client.requestBytes(.read, cookie: UInt64(100 + i), offset: offset, length: UInt32(data.count))
                    }
                    // A read is only ordered after a write once the write is acknowledged.
                    try client.send(writes)
                    for _ in 0..<8 { #expect(try client.simpleReply().error == 0) }
                    try client.send(reads)
                    for _ in 0..<8 {
                        let reply = try client.simpleReply()
                        #expect(reply.error == 0 && reply.cookie >= 100)
                        #expect(try client.receive(data.count) == data)
                    }
                }
            }
            try await group.waitForAll()
        }
        for peak in try await harness.server.peakBufferedBytes() {
            #expect(peak <= budget + Int(NBDLimits.acceptedMaxPayload), "a loop held \(peak) bytes")
            #expect(peak <= budget + (512 << 10))
        }
        await harness.stop()
    }

    /// Bad request magic closes that connection only.
    @Test func badMagicClosesOnlyThatConnection() async throws {
        let harness = try await ServerHarness()
        let other = try TestClient.connected(harness.socketPath)
        let client = try TestClient.connected(harness.socketPath)
        try client.send(be32(0x1234_5678) + [UInt8](repeating: 0, count: 24))
        #expect(client.isClosedByServer())
        #expect(try other.read(512, at: 0).count == 512)
        #expect(harness.isServing())
        await harness.stop()
    }

    /// Data after DISC is not applied; requests before it complete.
    @Test func dataAfterDisconnectIgnored() async throws {
        let harness = try await ServerHarness()
        let client = try TestClient.connected(harness.socketPath)
        let data = pattern(4096, seed: 1)
        try client.send(
            client.requestBytes(.write, cookie: 1, offset: 0, length: 4096) + data + client.requestBytes(.disconnect)
                + client.requestBytes(.write, cookie: 2, offset: 8192, length: 4096) + [UInt8](repeating: 0xAB, count: 4096)
        )
        #expect(try client.simpleReply() == (0, 1))
        #expect(client.isClosedByServer())
        let fresh = try TestClient.connected(harness.socketPath)
        #expect(try fresh.read(4096, at: 0) == data)
        #expect(try fresh.read(4096, at: 8192) == [UInt8](repeating: 0, count: 4096))
        await harness.stop()
    }

    /// Errors keep the connection: out of range, unknown command, zero length.
    @Test func errorsKeepConnection() async throws {
        let harness = try await ServerHarness(size: 1 << 20)
        let client = try TestClient.connected(harness.socketPath)
        #expect(try client.command(.read, offset: 1 << 20, length: 512) == NBDError.invalid.rawValue)
        try client.send(client.requestBytes(.write, offset: (1 << 20) - 256, length: 512) + [UInt8](repeating: 1, count: 512))
        #expect(try client.simpleReply().error == NBDError.noSpace.rawValue)
        try client.send(client.requestBytes(.read, offset: 0, length: 0))
        #expect(try client.simpleReply().error == NBDError.invalid.rawValue)
        try client.send(be32(NBDMagic.request) + be16(0) + be16(0x55) + be64(1) + be64(0) + be32(512))
        #expect(try client.simpleReply().error == NBDError.invalid.rawValue)
        #expect(try client.read(512, at: 0).count == 512)
        await harness.stop()
    }

    /// Structured replies: READ comes as one OFFSET_DATA chunk; BLOCK_STATUS reports a hole, then data.
    @Test func structuredReadAndBlockStatus() async throws {
        let harness = try await ServerHarness()
        let client = try TestClient.connected(harness.socketPath, structured: true)
        #expect(client.flags.contains(.sendDF))
        let data = pattern(4096, seed: 5)
        #expect(try client.write(data, at: 1 << 20) == 0)
        try client.send(client.requestBytes(.read, flags: .doNotFragment, cookie: 3, offset: 1 << 20, length: 4096))
        let chunk = try client.receive(20)
        #expect(be32(chunk, 0) == NBDMagic.structuredReply)
        #expect(be16(chunk, 4) == NBDReplyFlag.done)
        #expect(be16(chunk, 6) == NBDChunkType.offsetData.rawValue)
        #expect(be32(chunk, 16) == 8 + 4096)
        #expect(be64(try client.receive(8), 0) == 1 << 20)
        #expect(try client.receive(4096) == data)
        try client.send(client.requestBytes(.blockStatus, cookie: 4, offset: 0, length: (1 << 20) + 4096))
        let header = try client.receive(20)
        #expect(be16(header, 6) == NBDChunkType.blockStatus.rawValue)
        let payload = try client.receive(Int(be32(header, 16)))
        #expect(be32(payload, 0) == 1)
        #expect(be32(payload, 4) == 1 << 20)
        #expect(be32(payload, 8) == NBDAllocationState.hole | NBDAllocationState.zero)
        #expect(be32(payload, 16) == 0)
        await harness.stop()
    }

    /// Backpressure: a client that sends READs but never reads replies makes the server stop reading
    /// its socket; the server does not buffer requests or replies without bound.
    @Test func backpressureStopsReading() async throws {
        let harness = try await ServerHarness(size: 64 << 20)
        let client = try TestClient.connected(harness.socketPath)
        let (blocked, accepted) = try await floodUntilBlocked(client, client.requestBytes(.read, offset: 0, length: 32 << 20))
        #expect(blocked, "the server kept reading \(accepted) requests of 32 MiB without the client reading replies")
        #expect(harness.isServing())
        await harness.stop()
    }

    /// A client vanishing with many requests in flight leaves the server serving others.
    @Test func vanishingClientWithRequestsInFlight() async throws {
        let harness = try await ServerHarness(size: 64 << 20)
        do {
            let client = try TestClient.connected(harness.socketPath)
            var burst: [UInt8] = []
            for i in 0..<64 { burst += client.requestBytes(.read, cookie: UInt64(i), offset: UInt64(i) << 20, length: 1 << 20) }
            try client.send(burst)
        }
        #expect(harness.isServing())
        await harness.stop()
    }

    /// A client that never finishes the handshake is disconnected after the timeout.
    @Test func handshakeTimeout() async throws {
        let harness = try await ServerHarness { $0.limits.handshakeTimeout = .milliseconds(300) }
        let client = try TestClient(socketPath: harness.socketPath)
        _ = try client.receive(18)
        #expect(client.isClosedByServer())
        #expect(harness.isServing())
        await harness.stop()
    }

    /// Connections beyond the limit are closed at once; the ones within it keep working.
    @Test func connectionLimit() async throws {
        let harness = try await ServerHarness { $0.maxConnections = 2 }
        let first = try TestClient.connected(harness.socketPath)
        let second = try TestClient.connected(harness.socketPath)
        let third = try TestClient(socketPath: harness.socketPath)
        #expect(third.isClosedByServer())
        #expect(try first.read(512, at: 0).count == 512)
        #expect(try second.read(512, at: 0).count == 512)
        await harness.stop()
    }

    /// Many requests in flight on one connection all get their own reply (cookies echoed).
    @Test func pipelinedRequestsAllAnswered() async throws {
        let harness = try await ServerHarness()
        let client = try TestClient.connected(harness.socketPath)
        var burst: [UInt8] = []
        let data = pattern(4096, seed: 2)
        for i in 0..<200 {
            burst += client.requestBytes(.write, cookie: UInt64(1000 + i), offset: UInt64(i) * 4096, length: 4096) + data
        }
        try client.send(burst)
        var cookies = Set<UInt64>()
        for _ in 0..<200 {
            let reply = try client.simpleReply()
            #expect(reply.error == 0)
            cookies.insert(reply.cookie)
        }
        #expect(cookies == Set((0..<200).map { UInt64(1000 + $0) }))
        await harness.stop()
    }

    /// One pipelined burst mixing requests whose replies are batched (writes, flushes, errors) with
    /// READs whose data replies are written on their own: every reply arrives whole, exactly once,
    /// with the right error and the right data, however the two kinds interleave on the wire.
    @Test func mixedRepliesKeepTheirFraming() async throws {
        let size: UInt64 = 4 << 20
        let harness = try await ServerHarness(size: Int(size))
        let client = try TestClient.connected(harness.socketPath)
        let blocks = (0..<16).map { pattern(4096, seed: UInt8(40 + $0)) }
        for (index, block) in blocks.enumerated() { #expect(try client.write(block, at: UInt64(index) * 4096) == 0) }
        enum Expected { case done, error(UInt32), data([UInt8]) }
        var expected: [UInt64: Expected] = [:]
        var burst: [UInt8] = []
        for i in 0..<240 {
            let cookie = UInt64(5000 + i)
            switch i % 6 {
            case 0:
                let block = i / 6 % blocks.count
                burst += client.requestBytes(.read, cookie: cookie, offset: UInt64(block) * 4096, length: 4096)
                expected[cookie] = .data(blocks[block])
            case 1:
                burst += client.requestBytes(.write, cookie: cookie, offset: (1 << 20) + UInt64(i) * 4096, length: 4096) + blocks[0]
                expected[cookie] = .done
            case 2:
                burst += client.requestBytes(.read, cookie: cookie, offset: size, length: 512)
                expected[cookie] = .error(NBDError.invalid.rawValue)
            case 3:
                burst += client.requestBytes(.write, cookie: cookie, offset: size - 256, length: 512) + [UInt8](repeating: 9, count: 512)
                expected[cookie] = .error(NBDError.noSpace.rawValue)
            case 4:
                burst += client.requestBytes(.flush, cookie: cookie)
                expected[cookie] = .done
            default:
                burst += client.requestBytes(.read, cookie: cookie, offset: UInt64(i % blocks.count) * 4096 + 512, length: 1024)
                expected[cookie] = .data(Array(blocks[i % blocks.count][512..<1536]))
            }
        }
        try client.send(burst)
        for _ in 0..<expected.count {
            let reply = try client.simpleReply()
            let answered = expected.removeValue(forKey: reply.cookie)
            let want = try #require(answered, "cookie \(reply.cookie) unexpected or answered twice")
            switch want {
            case .done: #expect(reply.error == 0)
            case .error(let error): #expect(reply.error == error)
            case .data(let bytes):
                #expect(reply.error == 0)
                #expect(try client.receive(bytes.count) == bytes)
            }
        }
        #expect(expected.isEmpty)
        await harness.stop()
    }
}
