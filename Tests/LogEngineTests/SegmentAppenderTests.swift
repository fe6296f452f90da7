import BlockStore
import TestSupport
import Testing

@testable import LogEngine

#if canImport(Glibc)
import Glibc
#endif

/// The staging buffer that lets the log writer use direct I/O.
@Suite struct SegmentAppenderTests {
    /// Random pieces, flushed at random moments, through a file that rejects misaligned writes (as
    /// O_DIRECT does): the file holds exactly the appended bytes, then zeroes to a block boundary,
    /// and every flush reports that boundary. Pieces cross the staging buffer's end.
    @Test(arguments: TestSeed.list(0..<8)) func appendsThroughAlignedWritesOnly(seed: UInt64) throws {
        TestSeed.announce("appendsThroughAlignedWritesOnly", seed)
        var random = SplitMix64(state: seed)
        let disk = SimulatedDisk()
        let file = try disk.directory("mars").open("segment", create: true, direct: true)
        let appender = SegmentAppender(capacity: 3 * StorageAlignment.direct)
        appender.restart()
        var expected: [UInt8] = []
        for _ in 0..<60 {
            let piece = (0..<Int(random.next() % 9000)).map { _ in UInt8(truncatingIfNeeded: random.next() | 1) }
            try appender.append(piece, to: file)
            expected += piece
            #expect(appender.position == UInt64(expected.count))
            if random.next() % 3 == 0 {
                let end = try appender.flush(to: file)
                let padded = (expected.count + StorageAlignment.direct - 1) / StorageAlignment.direct * StorageAlignment.direct
                #expect(end == UInt64(padded))
                let content = try file.read(count: padded + 1, at: 0)
                #expect(content.count == padded)
                #expect(Array(content.prefix(expected.count)) == expected)
                #expect(content.dropFirst(expected.count).allSatisfy { $0 == 0 })
            }
        }
    }

    /// The simulated disk holds the appender to direct I/O's rules: a misaligned offset, length or
    /// buffer fails with EINVAL, as O_DIRECT does, so a mistake cannot hide in the tests.
    @Test func simulatedDirectFilesRejectMisalignedWrites() throws {
        let file = try SimulatedDisk().directory("mars").open("segment", create: true, direct: true)
        #expect(throws: SystemError.self) { try file.write([UInt8](repeating: 1, count: 4096), at: 512) }
        #expect(throws: SystemError.self) { try file.write([UInt8](repeating: 1, count: 100), at: 0) }
        var pointer: UnsafeMutableRawPointer?
        #expect(posix_memalign(&pointer, StorageAlignment.direct, 2 * StorageAlignment.direct) == 0)
        defer { free(pointer) }
        #expect(throws: SystemError.self) {
            try file.write([UnsafeRawBufferPointer(start: pointer! + 8, count: StorageAlignment.direct)], at: 0)
        }
        try file.write([UnsafeRawBufferPointer(start: pointer!, count: StorageAlignment.direct)], at: 4096)
        #expect(try file.size() == 8192)
    }

    /// A new segment starts at offset 0 with nothing staged from the previous one.
    @Test func restartBeginsAtZero() throws {
        let disk = SimulatedDisk()
        let directory = disk.directory("mars")
        let appender = SegmentAppender(capacity: 0)
        let first = try directory.open("one", create: true, direct: true)
        appender.restart()
        try appender.append([UInt8](repeating: 7, count: 5000), to: first)
        try appender.flush(to: first)
        let second = try directory.open("two", create: true, direct: true)
        appender.restart()
        try appender.append([1, 2, 3], to: second)
        #expect(try appender.flush(to: second) == UInt64(StorageAlignment.direct))
        #expect(try second.read(count: 4, at: 0) == [1, 2, 3, 0])
    }

    /// On a real filesystem the segment is opened with O_DIRECT where it can be (and buffered where
    /// it cannot, as on tmpfs); either way the appended bytes read back.
    @Test(arguments: ["/tmp", "/dev/shm"]) func realFilesReadBack(base: String) throws {
        var template = Array("\(base)/marsd-appender-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { return }  // no such filesystem here
        let path = String(cString: made)
        defer { _ = system("rm -rf '\(path)'") }
        let directory = try POSIXDirectory(path: path)
        let file = try directory.open("segment", create: true, direct: true)
        let appender = SegmentAppender(capacity: 2 * StorageAlignment.direct)
        appender.restart()
        let bytes = (0..<20_000).map { UInt8(truncatingIfNeeded: $0 * 7 + 1) }
        try appender.append(Array(bytes[..<12_345]), to: file)
        try appender.flush(to: file)
        try appender.append(Array(bytes[12_345...]), to: file)
        try appender.flush(to: file)
        try file.sync()
        let reopened = try directory.open("segment", create: false)
        #expect(try reopened.read(count: bytes.count, at: 0) == bytes)
    }
}
