import Testing

@testable import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// A temporary directory removed when the test ends.
final class TemporaryDirectory {
    let path: String

    init() {
        var template = Array("/tmp/marsd-test-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    deinit {
        _ = system("rm -rf '\(path)'")
    }

    /// Creates a sparse file of `size` bytes and returns its path.
    func sparseFile(_ name: String, size: Int) -> String {
        let file = "\(path)/\(name)"
        let fd = open(file, O_CREAT | O_RDWR, 0o600)
        precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        close(fd)
        return file
    }
}

/// Runs operations on a queue and waits for all of their results, as an event loop would.
func run(_ queue: any IOQueue, _ operations: [IOOperation]) -> [Int32] {
    var results = [Int32](repeating: Int32.min, count: operations.count)
    for (index, operation) in operations.enumerated() { queue.enqueue(operation, tag: UInt64(index)) }
    queue.submit()
    var remaining = operations.count
    while remaining > 0 {
        var poller = pollfd(fd: queue.completionFD, events: Int16(POLLIN), revents: 0)
        _ = poll(&poller, 1, 5000)
        drainEventFD(queue.completionFD)
        remaining -= queue.reap { tag, result in results[Int(tag)] = result }
    }
    return results
}

let uringAvailable = (try? URingIOQueue()) != nil

/// The whole text of a (proc or sys) file, or nil when it cannot be opened.
func textFile(_ path: String) -> String? {
    guard let stream = fopen(path, "r") else { return nil }
    defer { fclose(stream) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = fread(&chunk, 1, chunk.count, stream)
        if count <= 0 { break }
        bytes += chunk[..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The mapping of this process that contains `address`: start, length and VmFlags (/proc/self/smaps).
func smapsEntry(containing address: UInt) -> (start: UInt, length: Int, flags: [String])? {
    guard let text = textFile("/proc/self/smaps") else { return nil }
    var found: (start: UInt, length: Int, flags: [String])?
    for line in text.split(separator: "\n") {
        let fields = line.split(separator: " ")
        if let range = fields.first, range.contains("-"), !range.hasSuffix(":") {
            if found != nil { break }
            let bounds = range.split(separator: "-").compactMap { UInt($0, radix: 16) }
            if bounds.count == 2, bounds[0] <= address, address < bounds[1] {
                found = (bounds[0], Int(bounds[1] - bounds[0]), [])
            }
        } else if found != nil, fields.first == "VmFlags:" {
            found!.flags = fields.dropFirst().map(String.init)
        }
    }
    return found
}

func engines() -> [IOEngine] {
    if !uringAvailable { print("SKIP the io_uring cases of the block store tests: io_uring is not available here") }
    return uringAvailable ? [.uring, .posix] : [.posix]
}

@Suite("Block devices and I/O engines")
struct BlockStoreTests {
    /// A regular file opens with its size and kind; a missing one names the path and errno.
    @Test func openFile() throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20))
        #expect(device.size == 1 << 20)
        #expect(device.kind == .regularFile)
        #expect(device.directFD == nil)
        let error = #expect(throws: SystemError.self) { try BlockDevice(path: "\(dir.path)/missing") }
        #expect(error?.errno == ENOENT)
        #expect(error?.description.contains("missing") == true)
    }

    /// Directories are neither files nor block devices.
    @Test func openDirectoryFails() {
        let dir = TemporaryDirectory()
        #expect(throws: SystemError.self) { try BlockDevice(path: dir.path) }
    }

    /// Writes read back, with and without RWF_DSYNC, on every available engine.
    @Test(arguments: engines())
    func roundTrip(engine: IOEngine) throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20))
        let queue = try engine.makeQueue()
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        var readBack = [UInt8](repeating: 0, count: 8192)
        let results = data.withUnsafeBytes { source in
            readBack.withUnsafeMutableBytes { target in
                let writes = run(queue, [
                    .write(fd: device.bufferedFD, buffer: source.baseAddress!, count: 4096, offset: 4096, durable: false),
                    .write(fd: device.bufferedFD, buffer: source.baseAddress! + 4096, count: 4096, offset: 8192, durable: true),
                    .fdatasync(fd: device.bufferedFD),
                ])
                let reads = run(queue, [.read(fd: device.bufferedFD, buffer: target.baseAddress!, count: 8192, offset: 4096)])
                return writes + reads
            }
        }
        #expect(results == [4096, 4096, 0, 8192])
        #expect(readBack == data)
    }

    /// Where an io_uring cannot be created, `auto` falls back to the thread engine and `uring` fails
    /// with the errno (a ring of 0 entries is refused by every kernel, as a disabled io_uring would be).
    @Test func autoFallsBackWhenIOUringFails() throws {
        let fallback = try IOEngine.auto.makeQueue(ringEntries: 0)
        #expect(fallback.engineName == "threads")
        let error = #expect(throws: SystemError.self) { try IOEngine.uring.makeQueue(ringEntries: 0) }
        #expect(error?.operation == "io_uring_queue_init")
        if uringAvailable {
            #expect(try IOEngine.auto.makeQueue().engineName == "io_uring")
        }
    }

    /// A read past the end of a file returns a short count, never garbage.
    @Test(arguments: engines())
    func shortReadAtEnd(engine: IOEngine) throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 6000))
        let queue = try engine.makeQueue()
        var buffer = [UInt8](repeating: 0, count: 4096)
        let result = buffer.withUnsafeMutableBytes {
            run(queue, [.read(fd: device.bufferedFD, buffer: $0.baseAddress!, count: 4096, offset: 4096)])
        }
        #expect(result == [6000 - 4096])
    }

    /// Punching a hole and zeroing a range both read back as zeroes; the hole shows in allocation runs.
    @Test(arguments: engines())
    func punchAndZero(engine: IOEngine) throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20))
        let queue = try engine.makeQueue()
        let ones = [UInt8](repeating: 0xFF, count: 1 << 20)
        var readBack = [UInt8](repeating: 0xAA, count: 1 << 20)
        let results = ones.withUnsafeBytes { source in
            readBack.withUnsafeMutableBytes { target in
                run(queue, [.write(fd: device.bufferedFD, buffer: source.baseAddress!, count: 1 << 20, offset: 0, durable: false)])
                    + run(queue, [
                        .fallocate(fd: device.bufferedFD, mode: FallocateMode.punchHole, offset: 65536, length: 65536),
                        .fallocate(fd: device.bufferedFD, mode: FallocateMode.zeroRange, offset: 262_144, length: 4096),
                    ])
                    + run(queue, [.read(fd: device.bufferedFD, buffer: target.baseAddress!, count: 1 << 20, offset: 0)])
            }
        }
        #expect(results == [1 << 20, 0, 0, 1 << 20])
        #expect(readBack[65536..<131_072].allSatisfy { $0 == 0 })
        #expect(readBack[262_144..<266_240].allSatisfy { $0 == 0 })
        #expect(readBack[0..<65536].allSatisfy { $0 == 0xFF })
        let runs = device.allocationRuns(offset: 0, length: 1 << 20, maxRuns: 100)
        #expect(runs.first == AllocationRun(length: 65536, isHole: false))
        #expect(runs.dropFirst().first == AllocationRun(length: 65536, isHole: true))
        #expect(runs.reduce(0) { $0 + $1.length } == 1 << 20)
    }

    /// A fresh sparse file is one hole; the run list stops at maxRuns.
    @Test func allocationRuns() throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20))
        #expect(device.allocationRuns(offset: 4096, length: 8192, maxRuns: 10) == [AllocationRun(length: 8192, isHole: true)])
        let fd = device.bufferedFD
        var byte: UInt8 = 1
        for offset in stride(from: 0, to: 1 << 20, by: 131_072) { _ = pwrite(fd, &byte, 1, off_t(offset)) }
        #expect(device.allocationRuns(offset: 0, length: 1 << 20, maxRuns: 3).count == 3)
    }

    /// `isCached` is true only when every page of the range is in the page cache: after the pages
    /// are read, not after they are evicted, not when one page of the range is missing, never past
    /// the end, and false (not an error) where the kernel cannot tell.
    @Test func pageCacheResidency() throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20))
        guard device.canQueryPageCache else {
            print("SKIP pageCacheResidency: this kernel has no cachestat (Linux 6.5)")
            #expect(!device.isCached(offset: 0, length: 4096))
            return
        }
        let fd = device.bufferedFD
        var buffer = [UInt8](repeating: 7, count: 1 << 20)
        #expect(pwrite(fd, &buffer, buffer.count, 0) == buffer.count)
        #expect(fdatasync(fd) == 0 && posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        #expect(!device.isCached(offset: 0, length: 1 << 20))
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM) == 0)  // No readahead: only the pages read are cached.
        #expect(pread(fd, &buffer, 64 << 10, 8192) == 64 << 10)
        #expect(device.isCached(offset: 8192, length: 64 << 10))
        #expect(device.isCached(offset: 8192 + 100, length: (64 << 10) - 200), "a range inside cached pages")
        #expect(!device.isCached(offset: 8192 - 1, length: 64 << 10), "its first byte is on an uncached page")
        #expect(!device.isCached(offset: 8192 + 1, length: 64 << 10), "its last byte is on an uncached page")
        #expect(!device.isCached(offset: (1 << 20) - 4096, length: 8192), "past the end")
        #expect(!device.isCached(offset: 8192, length: 0))
    }

    /// Errors come back as -errno results, not crashes: writing a read-only descriptor fails with EBADF.
    @Test(arguments: engines())
    func errorsAreResults(engine: IOEngine) throws {
        let dir = TemporaryDirectory()
        let device = try BlockDevice(path: dir.sparseFile("a.img", size: 4096), readOnly: true)
        let queue = try engine.makeQueue()
        let data = [UInt8](repeating: 1, count: 512)
        let result = data.withUnsafeBytes {
            run(queue, [.write(fd: device.bufferedFD, buffer: $0.baseAddress!, count: 512, offset: 0, durable: false)])
        }
        #expect(result == [-EBADF])
    }

    /// Direct mode uses O_DIRECT only for aligned requests from aligned memory, else the buffered descriptor.
    /// Direct I/O memory: the requested size, huge-page aligned, zeroed, mapped in whole pages (whole
    /// huge pages from 2 MiB up, marked for huge pages where the kernel has them), and usable as the
    /// source of direct writes.
    @Test(arguments: [1, 4096, 5000, 2 << 20, (2 << 20) + 4096, 4 << 20])
    func directIOMemory(size: Int) throws {
        let memory = DirectIOMemory.allocate(size)
        defer { DirectIOMemory.deallocate(memory) }
        let base = UInt(bitPattern: memory.baseAddress)
        #expect(memory.count == size)
        #expect(base % UInt(DirectIOMemory.hugePageSize) == 0)
        #expect(memory.allSatisfy { $0 == 0 })
        memory[size - 1] = 0xA5
        let mapping = try #require(smapsEntry(containing: base), "no mapping at \(base)")
        #expect(mapping.start == base)
        #expect(mapping.length == DirectIOMemory.mappedLength(size))
        #expect(mapping.length % (size >= DirectIOMemory.hugePageSize ? DirectIOMemory.hugePageSize : 4096) == 0)
        let thp = textFile("/sys/kernel/mm/transparent_hugepage/enabled") ?? "[never]"
        if size >= DirectIOMemory.hugePageSize, !thp.contains("[never]") {
            #expect(mapping.flags.contains("hg"), "not marked for huge pages: \(mapping.flags)")
        }
        // The memory as the source of a direct write, read back through the page cache.
        let dir = TemporaryDirectory()
        let directory = try POSIXDirectory(path: dir.path)
        let file = try directory.open("direct", create: true, direct: true)
        if StorageAlignment.roundUp(size) == size {
            memory.initializeMemory(as: UInt8.self, repeating: 0x3C)
            try file.write([UnsafeRawBufferPointer(memory)], at: 0)
            #expect(try directory.open("direct", create: false).read(count: size, at: 0) == [UInt8](repeating: 0x3C, count: size))
        }
    }

    @Test func directDescriptorChoice() throws {
        let dir = TemporaryDirectory()
        let device: BlockDevice
        do {
            device = try BlockDevice(path: dir.sparseFile("a.img", size: 1 << 20), cacheMode: .direct)
        } catch {
            // Only a filesystem without O_DIRECT (tmpfs) may refuse; then there is nothing to check.
            #expect(error.errno == EINVAL, "opening with O_DIRECT failed: \(error)")
            return
        }
        let directFD = try #require(device.directFD)
        var pointer: UnsafeMutableRawPointer?
        #expect(posix_memalign(&pointer, 4096, 8192) == 0)
        defer { free(pointer) }
        #expect(device.descriptor(offset: 4096, length: 4096, address: pointer) == directFD)
        #expect(device.descriptor(offset: 4096 + 1, length: 4096, address: pointer) == device.bufferedFD)
        #expect(device.descriptor(offset: 4096, length: 100, address: pointer) == device.bufferedFD)
        if device.directMemoryAlignment > 1 {
            #expect(device.descriptor(offset: 4096, length: 4096, address: pointer! + 1) == device.bufferedFD)
        }
        // An O_DIRECT round trip of 512-byte granularity through the chosen descriptors.
        let queue = try IOEngine.auto.makeQueue()
        pointer!.initializeMemory(as: UInt8.self, repeating: 0x5A, count: 8192)
        let fd = device.descriptor(offset: 512, length: 512, address: pointer)
        let results = run(queue, [.write(fd: fd, buffer: pointer!, count: 512, offset: 512, durable: true)])
        #expect(results == [512])
    }
}
