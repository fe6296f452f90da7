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

/// A connection's receive buffers, sized like NIO's adaptive allocator, placed so that the next
/// received byte lands at a chosen offset in its page. While a large WRITE payload arrives, that is
/// the offset its bytes have in the file's pages, so the kernel's copy of each received piece into
/// the page cache runs between addresses at the same page offset (see `dispatch`: the same effect
/// on READs). Used on the connection's event loop only.
final class PayloadAligningReceiveBuffers: RecvByteBufferAllocator, @unchecked Sendable {
    private var sizes: AdaptiveRecvByteBufferAllocator
    /// Where in its page the next received byte should land; nil: anywhere.
    var nextByteOffsetInPage: Int?

    init(sizes: AdaptiveRecvByteBufferAllocator) {
        self.sizes = sizes
    }

    func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
        let size = sizes.nextBufferSize() ?? sizes.initial
        guard let offset = nextByteOffsetInPage, size > RequestBufferPool.smallestPooled else {
            return sizes.buffer(allocator: allocator)
        }
        var buffer = pageAlignedAllocator.buffer(capacity: directIOAlignment + size)
        buffer.moveWriterIndex(to: offset)
        buffer.moveReaderIndex(to: offset)
        return buffer
    }

    /// NIO reuses a buffer of its own, cleared (so without the chosen offset), when `nextBufferSize`
    /// is nil and this returned false: it never does, so an offset always gets a buffer from here.
    func record(actualReadBytes: Int) -> Bool {
        _ = sizes.record(actualReadBytes: actualReadBytes)
        return true
    }

    /// While an offset is chosen, nil: NIO then asks `buffer(allocator:)` instead of reusing a
    /// buffer of its own. Otherwise NIO reuses its buffers as with the adaptive allocator.
    func nextBufferSize() -> Int? { nextByteOffsetInPage == nil ? sizes.nextBufferSize() : nil }
}
