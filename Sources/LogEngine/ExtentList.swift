/// A range of device bytes and the pending change that shows in it.
struct Extent: Sendable, Equatable {
    var start: UInt64
    var end: UInt64
    var lsn: UInt64
}

/// Non-overlapping extents sorted by start, kept in chunks of at most `chunkCapacity`, so that an
/// insert moves at most one chunk's elements instead of every extent after it (a single sorted
/// array made each admitted write cost O(pending changes) on the event loop).
struct ExtentList: Sendable {
    /// Where an extent sits; `end` is one past the last extent.
    struct Position: Equatable {
        var chunk: Int
        var index: Int
    }

    private var chunks: [[Extent]] = []
    let chunkCapacity: Int

    init(chunkCapacity: Int = 256) {
        precondition(chunkCapacity >= 2, "a chunk must hold at least two extents")
        self.chunkCapacity = chunkCapacity
    }

    var end: Position { Position(chunk: chunks.count, index: 0) }

    subscript(position: Position) -> Extent { chunks[position.chunk][position.index] }

    func after(_ position: Position) -> Position {
        position.index + 1 < chunks[position.chunk].count
            ? Position(chunk: position.chunk, index: position.index + 1) : Position(chunk: position.chunk + 1, index: 0)
    }

    /// The first extent whose end lies after `offset` (binary search over chunks, then within one).
    func first(endingAfter offset: UInt64) -> Position {
        var low = 0
        var high = chunks.count
        while low < high {
            let middle = (low + high) / 2
            if chunks[middle][chunks[middle].count - 1].end <= offset { low = middle + 1 } else { high = middle }
        }
        guard low < chunks.count else { return end }
        var first = 0
        var last = chunks[low].count
        while first < last {
            let middle = (first + last) / 2
            if chunks[low][middle].end <= offset { first = middle + 1 } else { last = middle }
        }
        return Position(chunk: low, index: first)
    }

    /// Replaces the extents from `from` up to (not including) `to` by `new`, which must keep the
    /// list sorted and non-overlapping.
    mutating func replace<New: Collection<Extent>>(from: Position, to: Position, with new: New) {
        if from == end {
            if chunks.isEmpty || chunks[chunks.count - 1].count >= chunkCapacity { chunks.append([]) }
            chunks[chunks.count - 1].append(contentsOf: new)
            splitIfFull(chunks.count - 1)
        } else if to.chunk == from.chunk {
            chunks[from.chunk].replaceSubrange(from.index..<to.index, with: new)
            if chunks[from.chunk].isEmpty { chunks.remove(at: from.chunk) } else { splitIfFull(from.chunk) }
        } else {
            chunks[from.chunk].replaceSubrange(from.index..., with: new)
            var last = to.chunk
            if to != end {
                chunks[last].removeSubrange(0..<to.index)
                if chunks[last].isEmpty { last += 1 }
            }
            chunks.removeSubrange((from.chunk + 1)..<last)
            if chunks[from.chunk].isEmpty { chunks.remove(at: from.chunk) } else { splitIfFull(from.chunk) }
        }
    }

    /// Removes every extent `shouldRemove` selects, and packs the rest into half-full chunks.
    mutating func removeAll(where shouldRemove: (Extent) -> Bool) {
        var packed: [[Extent]] = []
        var current: [Extent] = []
        current.reserveCapacity(chunkCapacity)
        for chunk in chunks {
            for extent in chunk where !shouldRemove(extent) {
                current.append(extent)
                if current.count == chunkCapacity / 2 {
                    packed.append(current)
                    current = []
                    current.reserveCapacity(chunkCapacity)
                }
            }
        }
        if !current.isEmpty { packed.append(current) }
        chunks = packed
    }

    private mutating func splitIfFull(_ chunk: Int) {
        guard chunks[chunk].count > chunkCapacity else { return }
        let half = chunks[chunk].count / 2
        let upper = Array(chunks[chunk][half...])
        chunks[chunk].removeSubrange(half...)
        chunks.insert(upper, at: chunk + 1)
    }
}
