import BlockStore
import LogEngine
import NBDProtocol
import NIOCore
import Synchronization
import TestSupport
import Testing

@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// Large READs whose bytes are all in the page cache are sent with sendfile
/// (`PageCacheReadPolicy.sendfile`); everything else is read into a buffer. Both must answer with
/// the same bytes, and the sendfile path must never serve what it cannot: pages not cached, a
/// logged export's changes not yet written back, a server told to copy.
@Suite("READs sent from the page cache", .serialized)
struct PageCacheReadTests {
    private static func harness(_ transport: Transport, size: Int, policy: PageCacheReadPolicy = .sendfile) async throws -> ServerHarness {
        try await ServerHarness(size: size, transport: transport) { $0.pageCacheReads = policy }
    }

    private static func sentFromPageCache(_ harness: ServerHarness) -> Int {
        harness.server.exports.exports[0].statistics.pageCacheReads.load(ordering: .relaxed)
    }

    /// Drops the image's pages from the page cache (they are clean after fdatasync).
    private static func evict(_ path: String) {
        let fd = open(path, O_RDONLY)
        #expect(fd >= 0 && fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        close(fd)
    }

    /// Cached large READs of every shape (unaligned, exactly the smallest sent, several MiB, the
    /// device's end, structured) pipelined with smaller ones that are copied: every reply carries
    /// its own bytes, and exactly the large ones went through sendfile.
    @Test(arguments: Transport.allCases)
    func cachedLargeReadsAreSentFromThePageCache(transport: Transport) async throws {
        let harness = try await Self.harness(transport, size: 16 << 20)
        let client = try harness.connect()
        var random = SplitMix64(state: TestSeed.make("cachedLargeReadsAreSentFromThePageCache"))
        let model = randomBytes(16 << 20, &random)
        #expect(try client.write(model, at: 0) == 0)
        let smallest = try #require(PageCacheReadPolicy.sendfile.smallestSent(tcp: transport == .tcp))
        let large: [Range<Int>] = [
            12_345..<(12_345 + (1 << 20)), 4096..<(4096 + smallest), (3 << 20)..<(7 << 20), ((16 << 20) - smallest)..<(16 << 20),
        ]
        let small: [Range<Int>] = [100..<612, (1 << 20)..<((1 << 20) + smallest - 1)]
        let reads = large + small
        var burst: [UInt8] = []
        for (cookie, range) in reads.enumerated() {
            burst += client.requestBytes(.read, cookie: UInt64(cookie), offset: UInt64(range.lowerBound), length: UInt32(range.count))
            burst += client.requestBytes(.flush, cookie: UInt64(100 + cookie))
        }
        try client.send(burst)
        var answered = Set<UInt64>()
        for _ in 0..<(2 * reads.count) {
            let reply = try client.simpleReply()
            #expect(reply.error == 0)
            #expect(answered.insert(reply.cookie).inserted, "cookie \(reply.cookie) answered twice")
            if reply.cookie < 100 {
                let range = reads[Int(reply.cookie)]
                #expect(try client.receive(range.count) == Array(model[range]), "READ of \(range)")
            }
        }
        let structured = try harness.connect(structured: true)
        try structured.send(structured.requestBytes(.read, cookie: 9, offset: 5 << 20, length: 2 << 20))
        let chunk = try structured.receive(20)
        #expect(be32(chunk, 0) == NBDMagic.structuredReply && be16(chunk, 4) == NBDReplyFlag.done)
        #expect(be16(chunk, 6) == NBDChunkType.offsetData.rawValue && be32(chunk, 16) == 8 + (2 << 20))
        #expect(be64(try structured.receive(8), 0) == 5 << 20)
        #expect(try structured.receive(2 << 20) == Array(model[(5 << 20)..<(7 << 20)]))
        #expect(Self.sentFromPageCache(harness) == large.count + 1)
        #expect(harness.server.exports.exports[0].statistics.bytesRead.load(ordering: .relaxed) == reads.reduce(2 << 20) { $0 + $1.count })
        await harness.stop()
    }

    /// A READ of pages that are not cached would make sendfile wait for the disk on the event loop:
    /// it is read through the I/O engine, which caches it, so the next READ of it is sent.
    @Test(arguments: Transport.allCases)
    func uncachedReadsAreCopied(transport: Transport) async throws {
        let harness = try await Self.harness(transport, size: 8 << 20)
        let client = try harness.connect()
        let data = pattern(2 << 20, seed: 11)
        #expect(try client.write(data, at: 1 << 20) == 0)
        Self.evict(harness.imagePath)
        #expect(try client.read(2 << 20, at: 1 << 20) == data)
        #expect(Self.sentFromPageCache(harness) == 0)
        #expect(try client.read(2 << 20, at: 1 << 20) == data)
        #expect(Self.sentFromPageCache(harness) == 1)
        await harness.stop()
    }

    /// `--page-cache-reads copy`: nothing is sent from the page cache, and the bytes are the same.
    @Test func theCopyPolicyNeverSendsFromThePageCache() async throws {
        let harness = try await Self.harness(.unix, size: 8 << 20, policy: .copy)
        let client = try harness.connect()
        let data = pattern(4 << 20, seed: 12)
        #expect(try client.write(data, at: 0) == 0)
        #expect(try client.read(4 << 20, at: 0) == data)
        #expect(Self.sentFromPageCache(harness) == 0)
        await harness.stop()
    }

    /// Invariant 7 for sent READs: their replies hold no buffer, but each counts against the
    /// channel's write water mark, so a client that never reads its replies still makes the server
    /// stop reading its requests.
    @Test func backpressureHoldsForSentReads() async throws {
        let harness = try await Self.harness(.unix, size: 8 << 20)
        let client = try harness.connect()
        #expect(try client.write(pattern(8 << 20, seed: 14), at: 0) == 0)
        let (blocked, accepted) = try await floodUntilBlocked(client, client.requestBytes(.read, offset: 0, length: 8 << 20))
        #expect(blocked, "the server kept reading \(accepted) requests of 8 MiB without the client reading replies")
        // Taking requests stops once the replies queued pass the 4 MiB water mark: the first one.
        let sent = Self.sentFromPageCache(harness)
        #expect(sent > 0 && sent <= 4, "\(sent) READs of 8 MiB taken while the client read no reply")
        #expect(harness.isServing())
        await harness.stop()
    }

    /// Invariant 2's read side: a logged export's data device lags its log until writeback, so a READ
    /// must see acknowledged WRITEs that are still only in the log. With writeback held, the device
    /// (old bytes, all cached) is exactly what sendfile would send; the READ must be copied and
    /// overlaid instead. Once writeback has run, the same READ is sent from the page cache.
    @Test(arguments: Transport.allCases)
    func pendingLogChangesAreNeverSentFromThePageCache(transport: Transport) async throws {
        let size = 8 << 20
        let writeback = FileControl()
        writeback.blocked.withLock { $0 = true }
        let opener = ServerHarness.LogOpener { device, directory in
            let logDirectory = try POSIXDirectory(path: directory + "/log", create: true)
            var configuration = LogEngineConfiguration(host: "pagecache")
            configuration.segmentSize = 16 << 20
            try LogEngine.create(in: logDirectory, configuration: configuration, epoch: 1)
            let file = try POSIXDirectory(path: directory).open("disk.img", create: false)
            return try LogEngine.open(
                directory: logDirectory, device: ControlledFile(file, control: writeback), deviceSize: device.size, configuration: configuration
            )
        }
        let harness = try await ServerHarness(size: size, transport: transport, log: opener)
        let client = try harness.connect()
        let old = try client.read(1 << 20, at: 2 << 20)  // Caches the device's (zero) bytes.
        #expect(old == [UInt8](repeating: 0, count: 1 << 20))
        let new = pattern(1 << 20, seed: 13)
        #expect(try client.write(new, at: 2 << 20) == 0)
        #expect(try client.read(1 << 20, at: 2 << 20) == new, "a READ sent the device's bytes under a pending WRITE")
        let straddling = try client.read(1 << 20, at: (3 << 20) - (512 << 10))  // Half the WRITE, half the device.
        #expect(straddling == Array(new[(512 << 10)...]) + [UInt8](repeating: 0, count: 512 << 10))
        #expect(Self.sentFromPageCache(harness) == 0)
        writeback.blocked.withLock { $0 = false }
        let log = try #require(harness.server.exports.exports[0].log)
        for _ in 0..<500 where log.status.pendingChanges > 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(log.status.pendingChanges == 0, "writeback did not finish")
        #expect(try client.read(1 << 20, at: 2 << 20) == new)
        #expect(Self.sentFromPageCache(harness) == 1)
        #expect(log.shutdown().isComplete)
        await harness.stop()
    }
}
