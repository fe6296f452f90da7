import BlockStore
import Synchronization
import TransactionLog

extension ReplicaLog {
    /// A batch of records to apply, read from the local segments.
    struct ReplayBatch {
        var records: [LogRecord] = []
        var bytes: UInt64 = 0
        var endLSN: UInt64
        var endEpoch: UInt64
        var endSeals: SealRule
    }

    /// The end of the local log replay may read: durable, checked records only.
    static func availableLSN(_ state: State) -> UInt64 {
        guard let last = state.segments.last else { return state.replayedLSN }
        return last.firstLSN + last.size - UInt64(SegmentHeader.size)
    }

    /// Applies the local log from the replay position on, one batch at a time: read and check the
    /// records (up to `batchBytes` and `batchRecords`), store the batch's end as the intent, apply them in log order,
    /// sync the device, store the new position. Pausing or stopping waits for the batch in progress.
    func replayLoop() {
        while true {
            let plan = monitor.wait(
                replayWake,
                until: { state in
                    // A fork found by the receiver stops fetch, not the replay of what came before it.
                    state.stopping || (!state.replayPaused && state.failure == nil && Self.availableLSN(state) > state.replayedLSN)
                },
                then: { state -> (segments: [LocalSegment], position: UInt64, epoch: UInt64, seals: SealRule)? in
                    if state.stopping { return nil }
                    state.replaying = true
                    return (state.segments, state.replayedLSN, state.epoch, state.seals)
                }
            )
            guard let plan else {
                idle.broadcast()
                return
            }
            do {
                try replay(from: plan.position, epoch: plan.epoch, seals: plan.seals, segments: plan.segments)
            } catch let error as ReplicaLogError {
                monitor.withLock { state in
                    if error.kind == .fork { state.fork = error }
                    state.failure = error
                }
            } catch {
                monitor.withLock { state in
                    state.failure = ReplicaLogError(.io, segment: "-", offset: 0, "\(error)")
                }
            }
            monitor.withLock { $0.replaying = false }
            idle.broadcast()
        }
    }

    /// Whether a record ending at `end` lies within the data device: against the capacity last
    /// seen, then against the device as it is now, since a resize grows it while replay runs.
    /// Replay never writes beyond the device: a record past it stops replay (the resize protocol
    /// grows every member's device before any client may write there).
    private func fitsDevice(end: UInt64) -> Bool {
        if end <= deviceSize.load(ordering: .relaxed) { return true }
        guard let now = try? device.size() else { return false }
        deviceSize.store(now, ordering: .relaxed)
        return end <= now
    }

    /// Reads the records after `position` up to the batch size (at least one record), across
    /// segments, checking each (checksum, position, epoch, seal rules) as it goes.
    private func readBatch(from segments: [LocalSegment], position: UInt64, epoch: UInt64, seals: SealRule) throws -> ReplayBatch {
        guard var index = segments.lastIndex(where: { $0.firstLSN <= position }) else {
            throw ReplicaLogError(
                .misplaced, segment: segments.first?.name.fileName ?? "-", offset: 0,
                "the replay position \(position) is before the oldest local segment"
            )
        }
        var batch = ReplayBatch(endLSN: position, endEpoch: epoch, endSeals: seals)
        func batchHasRoom() -> Bool { batch.records.isEmpty || (batch.bytes < batchBytes && batch.records.count < Self.batchRecords) }
        while index < segments.count, batchHasRoom() {
            let segment = segments[index]
            let segmentEnd = segment.firstLSN + segment.size - UInt64(SegmentHeader.size)
            if batch.endLSN < segmentEnd {
                let file: any StorageFile
                do {
                    file = try directory.open(segment.name.fileName, create: false)
                } catch {
                    throw ReplicaLogError(.io, segment: segment.name.fileName, offset: 0, "cannot open it: \(error)")
                }
                let start = UInt64(SegmentHeader.size) + (batch.endLSN - segment.firstLSN)
                let bytes = BoundedFileBytes(file: file, count: segment.size)
                let scan = try scanBatch(bytes, from: start, firstLSN: batch.endLSN) { found in
                    guard batchHasRoom() else { throw BatchFull() }
                    let record = found.record
                    if let fork = batch.endSeals.check(record, in: segment.name) {
                        throw ReplicaLogError(.fork, segment: segment.name.fileName, offset: found.offset, fork)
                    }
                    if record.type == .epoch {
                        guard record.epoch >= batch.endEpoch else {
                            throw ReplicaLogError(.fork, segment: segment.name.fileName, offset: found.offset,
                                "an epoch record for epoch \(record.epoch) where the history is at epoch \(batch.endEpoch)")
                        }
                        batch.endEpoch = record.epoch
                    } else if record.epoch != batch.endEpoch {
                        throw ReplicaLogError(.fork, segment: segment.name.fileName, offset: found.offset,
                            "a record of epoch \(record.epoch) where the history is at epoch \(batch.endEpoch)")
                    }
                    if record.type.carriesRange, !fitsDevice(end: record.offset + record.length) {
                        throw ReplicaLogError(.corrupt, segment: segment.name.fileName, offset: found.offset,
                            "a record for bytes \(record.offset)..<\(record.offset + record.length) of a "
                                + "\(deviceSize.load(ordering: .relaxed))-byte device")
                    }
                    batch.records.append(record)
                    batch.bytes += UInt64(record.encodedSize)
                    batch.endLSN = record.lsn + UInt64(record.encodedSize)
                }
                // The receiver wrote whole, checked records only: anything else is damage since.
                switch scan?.end {
                case .corrupt(let offset, let defect), .tornTail(let offset, let defect):
                    throw ReplicaLogError(.corrupt, segment: segment.name.fileName, offset: UInt64(offset), "\(defect)")
                case .end, nil:
                    break
                }
                if batch.endLSN < segmentEnd { break }  // the batch is full
            }
            if index + 1 < segments.count, batch.endLSN == segments[index + 1].firstLSN {
                index += 1
            } else {
                break
            }
        }
        return batch
    }

    /// Applies batches back to back while more is available (and replay is neither paused nor
    /// stopping): store the intent, apply, sync the device; the position store after a batch also
    /// carries the next batch's intent, so each batch costs one device sync and one position sync.
    private func replay(from start: UInt64, epoch: UInt64, seals: SealRule, segments: [LocalSegment]) throws {
        var batch = try readBatch(from: segments, position: start, epoch: epoch, seals: seals)
        guard batch.endLSN > start else { return }
        monitor.withLock { $0.applyingLSN = batch.endLSN }
        try positionBox.value.store(start, intent: batch.endLSN)
        while true {
            for record in batch.records where record.type.carriesRange {
                try LogEngine.replay(record, onto: device)
                // The batch's device sync then waits for less: the disk works while replay reads on.
                if record.type == .write { device.startWriteback(offset: record.offset, length: record.length) }
            }
            try device.sync()
            // Applied: its payloads go before the next batch is read, or replay would hold two.
            batch.records = []
            let more = monitor.withLock { state -> [LocalSegment]? in
                guard !state.stopping, !state.replayPaused, Self.availableLSN(state) > batch.endLSN else { return nil }
                return state.segments
            }
            let next = try more.map { try readBatch(from: $0, position: batch.endLSN, epoch: batch.endEpoch, seals: batch.endSeals) }
            let intent = next?.endLSN ?? batch.endLSN
            try positionBox.value.store(batch.endLSN, intent: intent, epoch: batch.endEpoch)
            monitor.withLock { state in
                state.replayedLSN = batch.endLSN
                state.epoch = batch.endEpoch
                state.seals = batch.endSeals
                state.applyingLSN = intent
            }
            try removeReplayedSegments(upTo: batch.endLSN)
            guard let next, next.endLSN > batch.endLSN else { return }
            batch = next
        }
    }

    /// Segments wholly replayed go, except the newest (the fetch appends to it) and those another
    /// member may still fetch from here.
    private func removeReplayedSegments(upTo position: UInt64) throws {
        let finished = monitor.withLock { state in
            let crowded = state.segments.reduce(0) { $0 + $1.size } > spaceLimit / 2
            let holds = crowded ? [:] : state.retentionHolds
            return state.segments.indices.dropLast().filter {
                LogEngine.retirable(nextFirstLSN: state.segments[$0 + 1].firstLSN, position: position, holds: holds)
            }.map { state.segments[$0].name }
        }
        for name in finished {
            try directory.remove(name.fileName)
            monitor.withLock { state in state.segments.removeAll { $0.name == name } }
        }
        if !finished.isEmpty { try directory.sync() }
    }
}

/// Thrown by a scan's visit to end a full batch; not an error.
private struct BatchFull: Error {}

/// `scanRecords`, ended early by a full batch (nil then).
private func scanBatch(
    _ bytes: BoundedFileBytes, from start: UInt64, firstLSN: UInt64, _ visit: (ScannedRecord) throws -> Void
) throws -> RecordScan? {
    do {
        return try TransactionLog.scanRecords(bytes, from: start, firstLSN: firstLSN, visit)
    } catch is BatchFull {
        return nil
    }
}

/// The first `count` bytes of a segment file: the receiver's checked records, never bytes it is
/// still writing.
struct BoundedFileBytes: LogBytes {
    let file: any StorageFile
    let count: UInt64

    func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        guard offset < self.count else { return [] }
        return try file.read(count: Int(min(UInt64(count), self.count - offset)), at: offset)
    }
}
