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
    /// The end of each chunk's last extent: the search over chunks reads this one small array
    /// instead of one chunk per step (each a pointer to follow and a cache miss on the event loop).
    private var chunkEnds: [UInt64] = []
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
            if chunkEnds[middle] <= offset { low = middle + 1 } else { high = middle }
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
            if chunks.isEmpty || chunks[chunks.count - 1].count >= chunkCapacity {
                chunks.append([])
                chunkEnds.append(0)
            }
            chunks[chunks.count - 1].append(contentsOf: new)
            settle(chunks.count - 1)
        } else if to.chunk == from.chunk {
            chunks[from.chunk].replaceSubrange(from.index..<to.index, with: new)
            settle(from.chunk)
        } else {
            chunks[from.chunk].replaceSubrange(from.index..., with: new)
            var last = to.chunk
            if to != end {
                chunks[last].removeSubrange(0..<to.index)
                if chunks[last].isEmpty { last += 1 }
            }
            chunks.removeSubrange((from.chunk + 1)..<last)
            chunkEnds.removeSubrange((from.chunk + 1)..<last)
            settle(from.chunk)
        }
    }

    /// After `chunk` changed: drops it when empty, splits it when over capacity, updates its end.
    private mutating func settle(_ chunk: Int) {
        if chunks[chunk].isEmpty {
            chunks.remove(at: chunk)
            chunkEnds.remove(at: chunk)
            return
        }
        if chunks[chunk].count > chunkCapacity {
            let half = chunks[chunk].count / 2
            let upper = Array(chunks[chunk][half...])
            chunks[chunk].removeSubrange(half...)
            chunks.insert(upper, at: chunk + 1)
            chunkEnds.insert(upper[upper.count - 1].end, at: chunk + 1)
        }
        chunkEnds[chunk] = chunks[chunk][chunks[chunk].count - 1].end
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
        chunkEnds = packed.map { $0[$0.count - 1].end }
    }
}
