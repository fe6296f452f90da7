@_spi(CustomByteBufferAllocator) import NIOCore
import BlockStore

/// Page alignment for O_DIRECT buffers; at least what any filesystem or device here asks for.
let directIOAlignment = 4096

/// The allocator of every NBD connection's buffers: request payloads and read replies of 32 KiB
/// and more come from `RequestBufferPool` and go back to it, so a stream of large requests does not
/// page-fault fresh memory for each one.
let pooledAllocator = ByteBufferAllocator(
    allocate: { size in RequestBufferPool.shared.allocate(size, pageAligned: false) },
    reallocate: { old, oldSize, newSize in RequestBufferPool.shared.reallocate(old, oldSize: oldSize, newSize: newSize) },
    deallocate: { RequestBufferPool.shared.deallocate($0) },
    copy: { destination, source, count in destination.copyMemory(from: source, byteCount: count) }
)

/// The same, with storage that starts on a page boundary at every size, so read replies can reserve
/// their header in front of an O_DIRECT-aligned data area and be sent without a copy.
let pageAlignedAllocator = ByteBufferAllocator(
    allocate: { size in RequestBufferPool.shared.allocate(size, pageAligned: true) },
    reallocate: { old, oldSize, newSize in RequestBufferPool.shared.reallocate(old, oldSize: oldSize, newSize: newSize) },
    deallocate: { RequestBufferPool.shared.deallocate($0) },
    copy: { destination, source, count in destination.copyMemory(from: source, byteCount: count) }
)
