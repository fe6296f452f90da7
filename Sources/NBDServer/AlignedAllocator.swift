@_spi(CustomByteBufferAllocator) import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// Page alignment for O_DIRECT buffers; at least what any filesystem or device here asks for.
let directIOAlignment = 4096

/// A ByteBuffer allocator whose storage starts on a page boundary, so read replies can reserve
/// their header in front of an O_DIRECT-aligned data area and be sent without a copy.
let pageAlignedAllocator = ByteBufferAllocator(
    allocate: { size in
        var pointer: UnsafeMutableRawPointer?
        return posix_memalign(&pointer, directIOAlignment, max(size, 1)) == 0 ? pointer : nil
    },
    reallocate: { old, oldSize, newSize in
        var pointer: UnsafeMutableRawPointer?
        guard posix_memalign(&pointer, directIOAlignment, max(newSize, 1)) == 0, let pointer else { return nil }
        if let old {
            pointer.copyMemory(from: old, byteCount: min(oldSize, newSize))
            free(old)
        }
        return pointer
    },
    deallocate: { free($0) },
    copy: { destination, source, count in destination.copyMemory(from: source, byteCount: count) }
)
