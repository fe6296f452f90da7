/// What a logged, not yet written-back change holds.
public enum PendingContent: Sendable, Equatable {
    case data([UInt8])
    /// TRIM or WRITE_ZEROES: the range reads as zeroes; `keepAllocated` asks writeback not to punch
    /// holes (WRITE_ZEROES with NO_HOLE).
    case zeroes(length: Int, keepAllocated: Bool)

    var length: Int {
        switch self {
        case .data(let bytes): bytes.count
        case .zeroes(let length, _): length
        }
    }

    /// Memory one change holds besides its payload: its entry, up to three extents, and its record
    /// until the log writer has it. Counted so that many small changes (1-byte writes, trims, which
    /// have no payload) cannot hold far more memory than the map's capacity (invariant 7).
    public static let changeOverhead = 128

    /// Memory the change holds.
    var heldBytes: Int {
        if case .data(let bytes) = self { return bytes.count + Self.changeOverhead }
        return Self.changeOverhead
    }
}

/// One piece of a read or a writeback.
public enum PendingPiece: Sendable, Equatable {
    /// Bytes from a pending write.
    case data(offset: UInt64, bytes: ArraySlice<UInt8>)
    case zeroes(offset: UInt64, length: Int, keepAllocated: Bool)
    /// Not pending: read it from the data device.
    case device(offset: UInt64, length: Int)
}

/// A set of pending changes being written back together.
public struct WritebackBatch: Sendable, Equatable {
    /// The changes the batch retires, oldest first.
    public let lsns: [UInt64]
    /// What to write, sorted by device offset: for each byte only its newest change.
    public let pieces: [PendingPiece]
}

/// The writes that are durable in the log but not yet on the data device, by device range.
///
/// Reads overlay them on the device (the newest change of every byte wins). Writeback goes in
/// batches, one at a time, oldest changes first: a batch writes only the bytes no newer change has
/// replaced, and its changes leave the map when the batch is on the device. Because the next batch
/// starts only after that, an older change can never land on the device after a newer one, even
/// when a new change to the same range arrives while a batch is being written.
/// The map draws the bytes it holds (payloads and a fixed overhead per change) from a `PendingMemory`
/// the host's engines share; the caller waits for `hasRoom` (backpressure).
public struct PendingWriteMap: Sendable {
    private struct Entry: Sendable {
        var lsn: UInt64
        var offset: UInt64
        var content: PendingContent
    }

    /// Non-overlapping visible ranges, sorted by start.
    private var extents: ExtentList
    /// Pending changes in LSN order (found by binary search, no hashing); the first `batchCount`
    /// of them are being written back.
    private var entries = FIFO<Entry>()
    private var batchCount = 0
    public let memory: PendingMemory
    /// The bytes this map holds of `memory`.
    public private(set) var heldBytes = 0

    public init(memory: PendingMemory) {
        self.init(memory: memory, extentsPerChunk: 256)
    }

    /// A map with a memory budget of its own.
    public init(capacity: Int) {
        self.init(memory: PendingMemory(capacity: capacity))
    }

    /// `extentsPerChunk`: small values let tests cross chunk boundaries often.
    init(memory: PendingMemory, extentsPerChunk: Int) {
        self.memory = memory
        self.extents = ExtentList(chunkCapacity: extentsPerChunk)
    }

    public var isEmpty: Bool { entries.isEmpty }
    public var count: Int { entries.count }

    /// Whether a change of `bytes` payload bytes fits now. An empty map takes any one change, so a
    /// change larger than the capacity, or one that meets memory other maps hold, cannot wait forever.
    public func hasRoom(for bytes: Int) -> Bool {
        entries.isEmpty || memory.hasRoom(for: bytes + PendingContent.changeOverhead)
    }

    /// Records a change at `lsn` (newer than every change in the map) covering `offset`.
    public mutating func insert(lsn: UInt64, offset: UInt64, content: PendingContent) {
        precondition(entries.last.map { $0.lsn < lsn } ?? true, "changes must arrive in LSN order")
        let length = UInt64(content.length)
        guard length > 0 else { return }
        entries.append(Entry(lsn: lsn, offset: offset, content: content))
        heldBytes += content.heldBytes
        memory.take(content.heldBytes)
        let end = offset + length
        // Only the first overlapped extent can start before the new one, and only the last can
        // end after it: their outer parts stay visible.
        let from = extents.first(endingAfter: offset)
        var to = from
        var left: Extent?
        var right: Extent?
        while to != extents.end, extents[to].start < end {
            let old = extents[to]
            if old.start < offset { left = Extent(start: old.start, end: offset, lsn: old.lsn) }
            if old.end > end { right = Extent(start: end, end: old.end, lsn: old.lsn) }
            to = extents.after(to)
        }
        let new = Extent(start: offset, end: end, lsn: lsn)
        switch (left, right) {
        case (nil, nil): extents.replace(from: from, to: to, with: CollectionOfOne(new))
        case (let left?, nil): extents.replace(from: from, to: to, with: [left, new])
        case (nil, let right?): extents.replace(from: from, to: to, with: [new, right])
        case (let left?, let right?): extents.replace(from: from, to: to, with: [left, new, right])
        }
    }

    /// The pieces that make up `[offset, offset+length)`: pending changes where there are any, the
    /// device elsewhere, in order.
    public func read(offset: UInt64, length: Int) -> [PendingPiece] {
        let end = offset + UInt64(length)
        var pieces: [PendingPiece] = []
        var position = offset
        var index = extents.first(endingAfter: offset)
        while position < end {
            guard index != extents.end, extents[index].start < end else {
                pieces.append(.device(offset: position, length: Int(end - position)))
                break
            }
            let extent = extents[index]
            if extent.start > position {
                pieces.append(.device(offset: position, length: Int(extent.start - position)))
                position = extent.start
            }
            let pieceEnd = min(extent.end, end)
            pieces.append(piece(of: extent.lsn, from: position, to: pieceEnd))
            position = pieceEnd
            index = extents.after(index)
        }
        return pieces
    }

    /// Whether any pending change overlaps `[offset, offset+length)` (no allocation: the read path
    /// asks this first).
    public func overlaps(offset: UInt64, length: Int) -> Bool {
        let index = extents.first(endingAfter: offset)
        return index != extents.end && extents[index].start < offset + UInt64(length)
    }

    /// The LSN of the oldest change still in the map.
    public var oldestLSN: UInt64? { entries.first?.lsn }

    /// Starts writing back up to `maxChanges` of the oldest changes, only those with an LSN below
    /// `limit` (the durable ones); nil when there is nothing to do. Only one batch may be in flight.
    public mutating func beginWriteback(maxChanges: Int = .max, below limit: UInt64 = .max) -> WritebackBatch? {
        precondition(batchCount == 0, "a writeback batch is already in flight")
        var count = 0
        while count < min(maxChanges, entries.count), entries[count].lsn < limit { count += 1 }
        guard count > 0 else { return nil }
        batchCount = count
        var lsns: [UInt64] = []
        lsns.reserveCapacity(count)
        var pieces: [PendingPiece] = []
        pieces.reserveCapacity(count)
        for index in 0..<count {
            lsns.append(entries[index].lsn)
            appendVisibleParts(of: entries[index], to: &pieces)
        }
        pieces.sort { $0.offset < $1.offset }
        return WritebackBatch(lsns: lsns, pieces: pieces)
    }

    /// The batch is on the data device: its changes leave the map (bytes newer changes replaced in
    /// the meantime stay visible through those changes). Returns who waits for the memory given
    /// back: call them once no lock is held.
    @discardableResult
    mutating func finishWriteback(_ batch: WritebackBatch) -> [any PendingMemoryWaiter] {
        precondition(
            batch.lsns.count == batchCount && batch.lsns.first == entries.first?.lsn && batch.lsns.last == entries[batchCount - 1].lsn,
            "not the batch in flight"
        )
        let newest = entries[batchCount - 1].lsn
        var freed = 0
        for index in 0..<batchCount { freed += entries[index].content.heldBytes }
        heldBytes -= freed
        entries.removeFirst(batchCount)
        batchCount = 0
        // The batch holds the oldest changes: every extent still showing one of them goes, in one
        // pass (removing them one by one moved the array once per change, under the engine's lock).
        extents.removeAll { $0.lsn <= newest }
        return memory.giveBack(freed)
    }

    /// Gives back everything the map holds, when its engine stops with changes not written back
    /// (recovery writes them back at the next start); the map is not used after. Returns who waits
    /// for the memory.
    mutating func release() -> [any PendingMemoryWaiter] {
        defer { heldBytes = 0 }
        return memory.giveBack(heldBytes)
    }

    /// Appends the parts of `entry` no newer change has replaced.
    private func appendVisibleParts(of entry: Entry, to pieces: inout [PendingPiece]) {
        let end = entry.offset + UInt64(entry.content.length)
        var index = extents.first(endingAfter: entry.offset)
        while index != extents.end, extents[index].start < end {
            let extent = extents[index]
            if extent.lsn == entry.lsn { pieces.append(piece(of: entry, from: extent.start, to: extent.end)) }
            index = extents.after(index)
        }
    }

    private func piece(of lsn: UInt64, from start: UInt64, to end: UInt64) -> PendingPiece {
        // Binary search: entries are in LSN order, and every visible extent's change is pending.
        var low = 0
        var high = entries.count
        while low < high {
            let middle = (low + high) / 2
            if entries[middle].lsn < lsn { low = middle + 1 } else { high = middle }
        }
        precondition(low < entries.count && entries[low].lsn == lsn, "an extent shows a change that is not pending")
        return piece(of: entries[low], from: start, to: end)
    }

    private func piece(of entry: Entry, from start: UInt64, to end: UInt64) -> PendingPiece {
        switch entry.content {
        case .data(let bytes):
            let from = Int(start - entry.offset)
            return .data(offset: start, bytes: bytes[from..<(from + Int(end - start))])
        case .zeroes(_, let keepAllocated):
            return .zeroes(offset: start, length: Int(end - start), keepAllocated: keepAllocated)
        }
    }
}

extension PendingPiece {
    public var length: Int {
        switch self {
        case .data(_, let bytes): bytes.count
        case .zeroes(_, let length, _), .device(_, let length): length
        }
    }

    public var offset: UInt64 {
        switch self {
        case .data(let offset, _), .zeroes(let offset, _, _), .device(let offset, _): offset
        }
    }
}

/// An array with O(1) amortized removal from the front. Removed elements are released at once
/// (their slots are cleared), so a queue of writes never keeps payloads alive after they leave it.
struct FIFO<Element: Sendable>: Sendable, Sequence {
    private var storage: [Element?] = []
    private var head = 0

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }
    var first: Element? { isEmpty ? nil : storage[head] }
    var last: Element? { isEmpty ? nil : storage[storage.count - 1] }

    mutating func append(_ element: Element) { storage.append(element) }

    /// The element `index` places after the first.
    subscript(index: Int) -> Element { storage[head + index]! }

    mutating func removeFirst(_ count: Int) {
        precondition(count <= self.count, "removing more than the queue holds")
        for index in head..<(head + count) { storage[index] = nil }
        head += count
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head > 1024, head * 2 > storage.count {
            storage.removeFirst(head)
            head = 0
        }
    }

    mutating func popFirst() -> Element? {
        guard let element = first else { return nil }
        removeFirst(1)
        return element
    }

    func makeIterator() -> LazyMapSequence<ArraySlice<Element?>, Element>.Iterator {
        storage[head...].lazy.map { $0! }.makeIterator()
    }
}
