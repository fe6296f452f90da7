import Testing

@testable import BlockStore

/// The pool that keeps large request buffers mapped between requests (issue 18: a fresh 1 MiB
/// buffer per READ page-faulted a third of the event loop's time away).
@Suite struct RequestBufferPoolTests {
    static let MiB = 1 << 20

    @Test func aFreedBufferServesTheNextRequestOfItsClass() throws {
        let pool = RequestBufferPool(idleLimit: 64 * Self.MiB)
        // A 1 MiB read reply: the payload and its header.
        let first = try #require(pool.allocate(Self.MiB + 16, pageAligned: false))
        first.initializeMemory(as: UInt8.self, repeating: 7, count: Self.MiB + 16)
        pool.deallocate(first)
        #expect(pool.statistics == .init(reused: 0, created: 1, idleBytes: RequestBufferPool.capacity(ofClass: 4)))
        // A 1 MiB write payload is of the same class.
        let second = try #require(pool.allocate(Self.MiB, pageAligned: true))
        #expect(second == first)
        #expect(pool.statistics == .init(reused: 1, created: 1, idleBytes: 0))
        // Another class is not served from it.
        let other = try #require(pool.allocate(4 * Self.MiB, pageAligned: false))
        #expect(other != first)
        #expect(pool.statistics.created == 2)
        pool.deallocate(second)
        pool.deallocate(other)
    }

    @Test func sizeClassesHoldTheirPayloadWithAHeaderOrALeadingPage() {
        #expect(RequestBufferPool.sizeClass(for: 32 << 10) == nil)
        #expect(RequestBufferPool.sizeClass(for: (32 << 10) + 1) == 0)
        #expect(RequestBufferPool.sizeClass(for: 64 << 10) == 0)
        #expect(RequestBufferPool.sizeClass(for: (64 << 10) + 4096) == 0)
        #expect(RequestBufferPool.sizeClass(for: (64 << 10) + 4097) == 1)
        #expect(RequestBufferPool.sizeClass(for: Self.MiB + 4096) == 4)
        #expect(RequestBufferPool.sizeClass(for: 64 * Self.MiB + 4096) == 10)
        #expect(RequestBufferPool.sizeClass(for: 64 * Self.MiB + 4097) == nil)
        for size in [(32 << 10) + 1, 64 << 10, Self.MiB, 32 * Self.MiB + 20, 64 * Self.MiB + 4096] {
            let index = RequestBufferPool.sizeClass(for: size)!
            #expect(RequestBufferPool.capacity(ofClass: index) >= size)
            #expect(index == 0 || RequestBufferPool.capacity(ofClass: index - 1) < size)
        }
    }

    @Test func pageAlignedAndPooledBuffersStartOnAPage() throws {
        let pool = RequestBufferPool(idleLimit: 64 * Self.MiB)
        let sizes = [0, 1, 100, 4096, 32 << 10, (32 << 10) + 1, 64 << 10, Self.MiB + 16, Self.MiB + 4096, 64 * Self.MiB + 8192]
        for size in sizes {
            for pageAligned in [true, false] {
                let buffer = try #require(pool.allocate(size, pageAligned: pageAligned))
                if pageAligned || size > RequestBufferPool.smallestPooled {
                    #expect(Int(bitPattern: buffer) % 4096 == 0, "\(size) bytes, pageAligned \(pageAligned)")
                }
                // Every byte asked for is usable.
                buffer.initializeMemory(as: UInt8.self, repeating: 1, count: size)
                pool.deallocate(buffer)
            }
        }
    }

    @Test func buffersUnusedForAWholeIntervalGoBack() throws {
        let pool = RequestBufferPool(idleLimit: 64 * Self.MiB)
        let capacity = RequestBufferPool.capacity(ofClass: 4)
        let buffers = try (0..<3).map { _ in try #require(pool.allocate(Self.MiB, pageAligned: false)) }
        buffers.forEach(pool.deallocate)
        // They were all in use during this interval: none goes back.
        pool.releaseIdle()
        #expect(pool.statistics.idleBytes == 3 * capacity)
        // One is used again during the next interval: the two that were not go back.
        pool.deallocate(try #require(pool.allocate(Self.MiB, pageAligned: false)))
        pool.releaseIdle()
        #expect(pool.statistics.idleBytes == capacity)
        // Unused for a whole interval: it goes back too.
        pool.releaseIdle()
        #expect(pool.statistics.idleBytes == 0)
        #expect(pool.statistics.reused == 1)
    }

    @Test func theIdleLimitBoundsTheMemoryKept() throws {
        let capacity = RequestBufferPool.capacity(ofClass: 4)
        let pool = RequestBufferPool(idleLimit: 2 * capacity)
        let buffers = try (0..<3).map { _ in try #require(pool.allocate(Self.MiB, pageAligned: false)) }
        buffers.forEach(pool.deallocate)
        #expect(pool.statistics.idleBytes == 2 * capacity)
    }

    @Test func reallocateKeepsTheBytesAndTheAlignment() throws {
        let pool = RequestBufferPool(idleLimit: 64 * Self.MiB)
        func fill(_ buffer: UnsafeMutableRawPointer, _ count: Int) {
            for index in 0..<count { buffer.storeBytes(of: UInt8(truncatingIfNeeded: index &* 31), toByteOffset: index, as: UInt8.self) }
        }
        func check(_ buffer: UnsafeMutableRawPointer, _ count: Int) -> Bool {
            (0..<count).allSatisfy { buffer.load(fromByteOffset: $0, as: UInt8.self) == UInt8(truncatingIfNeeded: $0 &* 31) }
        }
        // small -> pooled -> same class -> larger class -> small
        var buffer = try #require(pool.allocate(1000, pageAligned: false))
        fill(buffer, 1000)
        buffer = try #require(pool.reallocate(buffer, oldSize: 1000, newSize: 100 << 10))
        #expect(check(buffer, 1000))
        fill(buffer, 100 << 10)
        let pooled = buffer
        buffer = try #require(pool.reallocate(buffer, oldSize: 100 << 10, newSize: 128 << 10))
        #expect(buffer == pooled)
        buffer = try #require(pool.reallocate(buffer, oldSize: 128 << 10, newSize: Self.MiB))
        #expect(check(buffer, 100 << 10))
        #expect(pool.statistics.idleBytes == RequestBufferPool.capacity(ofClass: 1))
        buffer = try #require(pool.reallocate(buffer, oldSize: Self.MiB, newSize: 500))
        #expect(check(buffer, 500))
        pool.deallocate(buffer)
        // A page-aligned small buffer stays page-aligned.
        var aligned = try #require(pool.allocate(512, pageAligned: true))
        fill(aligned, 512)
        aligned = try #require(pool.reallocate(aligned, oldSize: 512, newSize: 2048))
        #expect(Int(bitPattern: aligned) % 4096 == 0)
        #expect(check(aligned, 512))
        pool.deallocate(aligned)
        // nil grows from nothing.
        let fresh = try #require(pool.reallocate(nil, oldSize: 0, newSize: 64))
        pool.deallocate(fresh)
    }
}
