import TestSupport
import Testing

@testable import LogEngine

/// Applies pieces over the device bytes, as the read path will.
func compose(_ pieces: [PendingPiece], device: [UInt8]) -> [UInt8] {
    pieces.flatMap { piece -> [UInt8] in
        switch piece {
        case .data(_, let bytes): Array(bytes)
        case .zeroes(_, let length, _): [UInt8](repeating: 0, count: length)
        case .device(let offset, let length): Array(device[Int(offset)..<(Int(offset) + length)])
        }
    }
}

extension PendingPiece {
    var length: Int {
        switch self {
        case .data(_, let bytes): bytes.count
        case .zeroes(_, let length, _), .device(_, let length): length
        }
    }
}

/// Writes a batch's pieces onto the device bytes, as writeback will.
func apply(_ batch: WritebackBatch, to device: inout [UInt8]) {
    for piece in batch.pieces {
        switch piece {
        case .data(let offset, let bytes):
            device.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
        case .zeroes(let offset, let length, _):
            device.replaceSubrange(Int(offset)..<(Int(offset) + length), with: [UInt8](repeating: 0, count: length))
        case .device:
            Issue.record("writeback was asked to copy the device onto itself")
        }
    }
}

@Suite("Pending write map")
struct PendingWriteMapTests {
    /// Reads see the newest change of every byte; gaps come from the device.
    @Test func overlayNewestWins() {
        var map = PendingWriteMap(capacity: 1 << 20)
        map.insert(lsn: 1, offset: 10, content: .data([UInt8](repeating: 1, count: 20)))
        map.insert(lsn: 2, offset: 15, content: .data([UInt8](repeating: 2, count: 5)))
        map.insert(lsn: 3, offset: 28, content: .zeroes(length: 4, keepAllocated: false))
        let device = [UInt8](repeating: 9, count: 40)
        let expected: [UInt8] = Array(repeating: 9, count: 10) + Array(repeating: 1, count: 5) + Array(repeating: 2, count: 5)
            + Array(repeating: 1, count: 8) + Array(repeating: 0, count: 4) + Array(repeating: 9, count: 8)
        #expect(compose(map.read(offset: 0, length: 40), device: device) == expected)
        #expect(map.read(offset: 0, length: 5) == [.device(offset: 0, length: 5)])
    }

    /// A change that arrives while an older one is being written back is not overwritten by it:
    /// the batch retires the older change, and the newer one stays visible and pending.
    @Test func newChangeDuringWriteback() {
        var map = PendingWriteMap(capacity: 1 << 20)
        var device = [UInt8](repeating: 0, count: 8)
        map.insert(lsn: 1, offset: 0, content: .data([UInt8](repeating: 1, count: 8)))
        let batch = map.beginWriteback()!
        map.insert(lsn: 2, offset: 2, content: .data([UInt8](repeating: 2, count: 4)))
        apply(batch, to: &device)
        map.finishWriteback(batch)
        #expect(compose(map.read(offset: 0, length: 8), device: device) == [1, 1, 2, 2, 2, 2, 1, 1])
        let next = map.beginWriteback()!
        #expect(next.lsns == [2])
        apply(next, to: &device)
        map.finishWriteback(next)
        #expect(device == [1, 1, 2, 2, 2, 2, 1, 1])
        #expect(map.isEmpty && map.heldBytes == 0)
    }

    /// A batch writes only the newest version of bytes several of its changes wrote, sorted by offset.
    @Test func batchWritesNewestOnlySorted() {
        var map = PendingWriteMap(capacity: 1 << 20)
        map.insert(lsn: 1, offset: 100, content: .data([1, 1, 1, 1]))
        map.insert(lsn: 2, offset: 0, content: .zeroes(length: 4, keepAllocated: false))
        map.insert(lsn: 3, offset: 101, content: .data([3, 3]))
        let batch = map.beginWriteback()!
        #expect(batch.lsns == [1, 2, 3])
        #expect(batch.pieces == [
            .zeroes(offset: 0, length: 4, keepAllocated: false), .data(offset: 100, bytes: [1]), .data(offset: 101, bytes: [3, 3]),
            .data(offset: 103, bytes: [1]),
        ])
    }

    /// The map is bounded: room is reported by held bytes (payload and a fixed overhead per
    /// change); an empty map takes anything.
    @Test func capacity() {
        let overhead = PendingContent.changeOverhead
        var map = PendingWriteMap(capacity: 100 + 3 * overhead)
        #expect(map.hasRoom(for: 10_000))
        map.insert(lsn: 1, offset: 0, content: .data([UInt8](repeating: 1, count: 60)))
        #expect(map.hasRoom(for: 40 + overhead) && !map.hasRoom(for: 41 + overhead))
        map.insert(lsn: 2, offset: 0, content: .zeroes(length: 1 << 30, keepAllocated: false))
        #expect(map.heldBytes == 60 + 2 * overhead)  // Zeroes hold no payload however long the range.
        let batch = map.beginWriteback(maxChanges: 1)!
        map.finishWriteback(batch)
        #expect(map.heldBytes == overhead)
    }

    /// Maps that share a memory see each other's changes; one that holds nothing takes anything;
    /// giving back memory someone waits for returns the waiter, once.
    @Test func mapsShareTheirMemory() {
        final class Waiter: PendingMemoryWaiter {
            func pendingMemoryFreed() {}
        }
        let overhead = PendingContent.changeOverhead
        let memory = PendingMemory(capacity: 100 + 2 * overhead)
        var first = PendingWriteMap(memory: memory)
        var second = PendingWriteMap(memory: memory)
        first.insert(lsn: 1, offset: 0, content: .data([UInt8](repeating: 1, count: 60)))
        second.insert(lsn: 1, offset: 0, content: .data([UInt8](repeating: 2, count: 30)))
        #expect(memory.heldBytes == 90 + 2 * overhead)
        #expect(!first.hasRoom(for: 11) && !second.hasRoom(for: 11), "room is what both maps left")
        #expect(PendingWriteMap(memory: memory).hasRoom(for: 10_000), "a map that holds nothing takes anything")
        let waiter = Waiter()
        memory.wait(waiter)
        memory.wait(waiter)
        #expect(first.finishWriteback(first.beginWriteback()!).count == 1, "the waiter, once")
        #expect(memory.heldBytes == 30 + overhead)
        #expect(second.release().isEmpty, "nobody waits any more")
        #expect(memory.heldBytes == 0 && second.heldBytes == 0)
    }

    /// Invariant 7: changes without payload (trims, zeroes) and tiny writes are bounded too.
    @Test func manySmallChangesFillTheMap() {
        var map = PendingWriteMap(capacity: 64 << 10)
        var admitted = 0
        while admitted < 100_000, map.hasRoom(for: 0) {
            let content: PendingContent = admitted % 2 == 0 ? .zeroes(length: 4096, keepAllocated: false) : .data([1])
            map.insert(lsn: UInt64(admitted + 1), offset: UInt64(admitted) * 8192, content: content)
            admitted += 1
        }
        #expect(admitted > 0 && admitted <= (64 << 10) / PendingContent.changeOverhead)
    }

    /// Property: under random inserts, reads and writeback batches that stay in flight while more
    /// changes and reads arrive, a reader always sees the device with every change applied in LSN
    /// order, and after draining the device itself equals that. Small extent chunks (2-4) make
    /// nearly every insert, read and removal cross chunk boundaries.
    @Test(arguments: TestSeed.list(1...40))
    func modelProperty(seed: UInt64) {
        TestSeed.announce("modelProperty", seed)
        var rng = SplitMix64(state: seed)
        let size = 4096
        var device = (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var logical = device
        var map = PendingWriteMap(memory: PendingMemory(capacity: 1 << 20), extentsPerChunk: [2, 3, 4, 256][Int(seed % 4)])
        var inFlight: WritebackBatch?
        var lsn: UInt64 = 0
        for _ in 0..<800 {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<5:
                lsn += 1
                let offset = Int.random(in: 0..<size, using: &rng)
                let length = Int.random(in: 1...min(700, size - offset), using: &rng)
                let content: PendingContent = Bool.random(using: &rng)
                    ? .data((0..<length).map { _ in UInt8.random(in: 0...255, using: &rng) })
                    : .zeroes(length: length, keepAllocated: false)
                map.insert(lsn: lsn, offset: UInt64(offset), content: content)
                switch content {
                case .data(let bytes): logical.replaceSubrange(offset..<(offset + length), with: bytes)
                case .zeroes: logical.replaceSubrange(offset..<(offset + length), with: [UInt8](repeating: 0, count: length))
                }
            case 5..<7:
                guard inFlight == nil, let batch = map.beginWriteback(maxChanges: Int.random(in: 1...6, using: &rng)) else { continue }
                // Writes within a batch may complete in any order, so its pieces must not overlap.
                for (a, b) in zip(batch.pieces, batch.pieces.dropFirst()) {
                    #expect(a.offset + UInt64(a.length) <= b.offset, "overlapping writeback pieces")
                }
                // The device may change as soon as the batch starts; reads must not notice.
                apply(batch, to: &device)
                inFlight = batch
            case 7:
                if let batch = inFlight {
                    map.finishWriteback(batch)
                    inFlight = nil
                }
            default:
                let offset = Int.random(in: 0..<size, using: &rng)
                let length = Int.random(in: 1...(size - offset), using: &rng)
                #expect(compose(map.read(offset: UInt64(offset), length: length), device: device) == Array(logical[offset..<(offset + length)]))
            }
        }
        if let batch = inFlight { map.finishWriteback(batch) }
        while let batch = map.beginWriteback(maxChanges: 3) {
            apply(batch, to: &device)
            map.finishWriteback(batch)
        }
        #expect(device == logical)
        #expect(map.isEmpty && map.heldBytes == 0)
    }
}
