import NIOCore
import Testing

@testable import NBDServer

/// Where received WRITE payloads land (issue 18: the kernel's copy into the page cache is slower
/// between addresses at different offsets in their pages).
@Suite struct ReceiveBufferTests {
    let sizes = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 << 10, maximum: 1 << 20)

    @Test func aChosenOffsetIsWhereTheNextByteLands() {
        let buffers = PayloadAligningReceiveBuffers(sizes: sizes)
        for offset in [0, 1, 28, 4068, 4095] {
            buffers.nextByteOffsetInPage = offset
            // NIO must ask for a buffer, not reuse one of its own (cleared: the offset would be lost).
            #expect(buffers.nextBufferSize() == nil)
            var buffer = buffers.buffer(allocator: pooledAllocator)
            #expect(buffer.readableBytes == 0)
            #expect(buffer.writableBytes >= 64 << 10)
            let address = buffer.withUnsafeMutableWritableBytes { Int(bitPattern: $0.baseAddress!) }
            #expect(address % 4096 == offset, "offset \(offset)")
        }
    }

    @Test func withoutAnOffsetBuffersAreNIOsAdaptiveOnes() {
        let buffers = PayloadAligningReceiveBuffers(sizes: sizes)
        #expect(buffers.nextBufferSize() == sizes.nextBufferSize())
        let buffer = buffers.buffer(allocator: pooledAllocator)
        #expect(buffer.readerIndex == 0)
        #expect(buffer.capacity >= 64 << 10)
        // record always says "may grow", so NIO never reuses a buffer cleared behind an offset.
        #expect(buffers.record(actualReadBytes: 100))
        #expect(buffers.record(actualReadBytes: 1 << 20))
    }
}
