#if canImport(Glibc)
import Glibc
#endif

/// Memory that direct I/O reads from over and over (the log's staging buffer, the block of
/// zeroes): page-aligned and, where the kernel has transparent huge pages, in 2 MiB pages. Each
/// direct write pins the pages it reads; pinning one huge page instead of 512 small ones took a
/// fifth off the log writer's CPU and two thirds off zero-filling spares (BENCHMARKS.md, session 6).
public enum DirectIOMemory {
    public static let hugePageSize = 2 << 20

    /// Maps `size` bytes (at least one) of zeroed memory, aligned to a huge page. Whole huge pages
    /// of it are huge-page backed where the kernel allows (a hint: without it the memory is the same,
    /// in small pages). Trap when the address space is exhausted, as an allocation would.
    public static func allocate(_ size: Int) -> UnsafeMutableRawBufferPointer {
        precondition(size > 0, "direct I/O memory of \(size) bytes")
        let length = mappedLength(size)
        // Map a huge page more than needed, then give back what lies outside the aligned range.
        let raw = mmap(nil, length + hugePageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        precondition(raw != MAP_FAILED, "cannot map \(length) bytes of direct I/O memory: errno \(errno)")
        let start = UInt(bitPattern: raw)
        let aligned = (start + UInt(hugePageSize) - 1) & ~UInt(hugePageSize - 1)
        let head = Int(aligned - start)
        if head > 0 { munmap(raw, head) }
        munmap(UnsafeMutableRawPointer(bitPattern: aligned + UInt(length)), hugePageSize - head)
        let pointer = UnsafeMutableRawPointer(bitPattern: aligned)!
        if length >= hugePageSize { _ = madvise(pointer, length, MADV_HUGEPAGE) }
        return UnsafeMutableRawBufferPointer(start: pointer, count: size)
    }

    /// Unmaps memory from `allocate`.
    public static func deallocate(_ buffer: UnsafeMutableRawBufferPointer) {
        munmap(buffer.baseAddress, mappedLength(buffer.count))
    }

    /// What `allocate` maps for `size` bytes: whole pages, and whole huge pages from one up.
    static func mappedLength(_ size: Int) -> Int {
        let unit = size >= hugePageSize ? hugePageSize : Int(sysconf(Int32(_SC_PAGESIZE)))
        return (size + unit - 1) / unit * unit
    }
}
