import BlockStore
import Logging
import NIOCore
import NIOPosix
import PeerProtocol
@testable import Replication
import Testing

/// The primary's answer to one compare request, from an in-memory device.
@Suite struct SyncComparisonTests {
    static let chunk = SyncChunk.size

    /// `chunks` chunks of the device: `nil` is a chunk of zeroes, else filled with that byte.
    static func device(_ chunks: [UInt8?]) -> [UInt8] {
        chunks.flatMap { [UInt8](repeating: $0 ?? 0, count: chunk) }
    }

    static func answer(device bytes: [UInt8], replica: [UInt8], size: UInt64? = nil) throws -> [PeerMessage] {
        let digests = stride(from: 0, to: replica.count, by: chunk).map { ChunkDigest.of(Array(replica[$0..<$0 + chunk])) }
        let comparison = SyncComparison(
            request: SyncCompare(resource: "vm1", offset: 0, chunkSize: UInt32(chunk), digests: digests),
            size: size ?? UInt64(bytes.count), device: nil, allocator: ByteBufferAllocator()
        ) { buffer, offset throws(SystemError) in
            let count = min(buffer.count, max(0, bytes.count - Int(offset)))
            bytes.withUnsafeBytes { source in buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[Int(offset)..<Int(offset) + count])) }
            return count
        }
        return try comparison.differences()
    }

    /// What each message says, as (kind, offset, length) with offsets and lengths in chunks.
    static func shape(_ messages: [PeerMessage]) -> [String] {
        messages.map { message in
            switch message {
            case .syncData(let data): "data \(Int(data.offset) / chunk)+\(data.bytes.readableBytes / chunk)"
            case .syncZero(let zero): "zero \(Int(zero.offset) / chunk)+\(Int(zero.length) / chunk)"
            default: message.name
            }
        }
    }

    /// Differing chunks in a row travel together up to one read (1 MiB), equal chunks break a run,
    /// zeroes go as one length however long, and the data sent is the primary's.
    @Test func differingChunksAreGathered() throws {
        // 40 chunks: 20 differing data chunks, 1 equal, 3 data, 14 zero (replica has data), 2 zero on both.
        let primary: [UInt8?] = Array(repeating: 7, count: 20) + [9] + [5, 5, 5] + Array(repeating: nil, count: 14) + [nil, nil]
        let replica: [UInt8?] = Array(repeating: 1, count: 20) + [9] + [nil, nil, nil] + Array(repeating: 3, count: 14) + [nil, nil]
        let messages = try Self.answer(device: Self.device(primary), replica: Self.device(replica))
        #expect(Self.shape(messages) == ["data 0+16", "data 16+4", "data 21+3", "zero 24+14"])
        let device = Self.device(primary)
        for case .syncData(let data) in messages {
            let start = Int(data.offset)
            #expect(Array(data.bytes.readableBytesView) == Array(device[start..<start + data.bytes.readableBytes]))
        }
    }

    /// A zero run goes on across reads; one chunk of data between zeroes splits it.
    @Test func zeroRunsCrossReads() throws {
        let primary: [UInt8?] = Array(repeating: nil, count: 40) + [4] + [nil, nil]
        let replica: [UInt8?] = Array(repeating: 2, count: 43)
        #expect(Self.shape(try Self.answer(device: Self.device(primary), replica: Self.device(replica))) == ["zero 0+40", "data 40+1", "zero 41+2"])
    }

    /// Chunks beyond the device's size are not answered; a device shorter than its size is an error.
    @Test func theDeviceEnd() throws {
        let device = Self.device([6, 6])
        #expect(Self.shape(try Self.answer(device: device, replica: Self.device([nil, nil, nil]))) == ["data 0+2"])
        #expect(throws: ReplicationError.self) {
            try Self.answer(device: device, replica: Self.device([nil, nil, nil]), size: UInt64(3 * Self.chunk))
        }
    }

    /// A primary that answers outside the ranges the replica asked about fails the sync (and the
    /// replica writes nothing there).
    @Test func anAnswerOutsideTheComparedRangesFailsTheSync() async throws {
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let logger = Logger(label: "test")
        let listener = try await PeerListener.start(
            on: PeerAddress(host: "127.0.0.1", port: 0), group: group, credentials: { LinkTests.credentials("alpha") }, logger: logger
        ) { link in
            link.onMessage = { message in
                guard case .syncCompare(let request) = message else { return }
                // Beyond the first request's 256 chunks (16 MiB), which the 4 MiB device ends within.
                let beyond = request.offset + UInt64(request.digests.count) * UInt64(request.chunkSize)
                link.send(.syncData(SyncData(resource: "vm1", offset: beyond, bytes: [UInt8](repeating: 1, count: 4096))))
            }
        }
        let address = PeerAddress(host: "127.0.0.1", port: try #require(listener.port))
        let link = try await PeerLink.connect(to: address, group: group, credentials: LinkTests.credentials("beta"), logger: logger).get()
        let client = SyncClient(
            resource: "vm1", device: try BlockDevice(path: hosts.path + "/replica.img"), size: TwoHosts.size, start: 0,
            loop: link.eventLoop, pool: NIOThreadPool.singleton, logger: logger
        ) { _ in }
        await #expect(throws: ReplicationError.self) { try await client.run(over: link).get() }
        #expect(client.status.problem?.contains("outside the ranges being compared") == true, "\(client.status.problem ?? "no problem")")
        await listener.stop()
        try await group.shutdownGracefully()
    }
}
