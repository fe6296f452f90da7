import BlockStore
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

extension LogEngine {
    // MARK: - Log writer thread

    /// Takes every queued record, appends it to the open segment (rotating by size), fdatasyncs once,
    /// and completes every FUA write and FLUSH the commit covers. On an error the records stay
    /// queued, requests that wait for durability fail, and the writer retries every second.
    func logWriterLoop() {
        var failing = false
        // A rotation that failed is done again before anything else is appended: records appended
        // to the old segment would overlap the LSNs a half-made next segment already claims.
        var rotationFailed = false
        var failingSince: ContinuousClock.Instant?
        while true {
            if failing {
                monitor.wait(writerWake, timeout: .seconds(1), until: { $0.halted }, then: { _ in })
                // Going down while the log cannot be written: after a while the records nobody was
                // promised durability for are given up, so that `down` and SIGTERM end. Writes
                // acknowledged as durable are in the log already; the rest were never flushed.
                if let since = failingSince, since.duration(to: .now) >= configuration.stoppingRetryLimit,
                    monitor.withLock({ state in state.stopping })
                {
                    monitor.withLock { state in
                        state.queue = []
                        state.queuedBytes = 0
                        state.writerDone = true
                    }
                    writebackWake.signal()
                    return
                }
            }
            monitor.wait(
                writerWake, until: { $0.halted || !$0.queue.isEmpty || ($0.stopping && $0.waitingWrites.isEmpty) }, then: { _ in }
            )
            // While nobody waits for durability, gather records a moment longer: fewer, larger
            // commits, and fewer wakeups of every thread on a busy host. Nothing is promised durable
            // before a FUA write or a FLUSH, which end the wait.
            let batch: [QueuedRecord]? = monitor.wait(
                writerWake, timeout: Self.lazyCommitDelay, until: { commitDue($0) },
                then: { state in
                    if state.halted { return nil }
                    if state.queue.isEmpty {
                        state.writerDone = true
                        return nil
                    }
                    defer { state.queue = [] }
                    return state.queue
                }
            )
            guard let batch else {
                writebackWake.signal()
                return
            }
            var remaining = batch[...]
            do {
                while let first = remaining.first?.record {
                    var open = openSegment.value
                    // A new file's blocks are unwritten, so each commit's fdatasync also commits the
                    // filesystem journal: move on to a spare as soon as one is ready.
                    let full = open.size + UInt64(first.encodedSize) > configuration.segmentSize
                    if rotationFailed || open.records > 0 && (full || (!open.overwrites && monitor.withLock({ !$0.spares.isEmpty }))) {
                        let beforeRotation = open.appender.mark()
                        do {
                            open = try rotate(from: open, firstLSN: first.lsn, epoch: first.epoch)
                        } catch {
                            open.appender.rewind(to: beforeRotation)
                            rotationFailed = true
                            throw error
                        }
                        rotationFailed = false
                        openSegment.value = open
                    }
                    // The records that go into this segment.
                    var count = 0
                    var bytes: UInt64 = 0
                    for queued in remaining {
                        let size = UInt64(queued.record.encodedSize)
                        if open.records + count > 0, open.size + bytes + size > configuration.segmentSize { break }
                        count += 1
                        bytes += size
                    }
                    let group = remaining.prefix(count)
                    let last = group.last!.record
                    var digest = open.digest
                    let beforeCommit = open.appender.mark()
                    var fileEnd: UInt64
                    do {
                        fileEnd = try append(group, to: open, digest: &digest)
                        try open.file.sync()
                        if last.type == .seal {
                            // A seal is the last record of its segment: the file ends right after it.
                            fileEnd = open.size + bytes
                            try open.file.truncate(to: fileEnd)
                            try open.file.sync()
                        }
                    } catch {
                        open.appender.rewind(to: beforeCommit)
                        throw error
                    }
                    open.size += bytes
                    open.fileSize = last.type == .seal ? fileEnd : max(open.fileSize, fileEnd)
                    open.records += count
                    open.digest = digest
                    openSegment.value = open
                    remaining = remaining.dropFirst(count)
                    let endLSN = last.lsn + UInt64(last.encodedSize)
                    let (completions, prepare) = monitor.withLock { state -> ([(any LogCompletionTarget, LogCompletion)], Bool) in
                        state.durableLSN = endLSN
                        state.queuedBytes -= bytes
                        state.segments[state.segments.count - 1].fileSize = open.fileSize
                        state.groupCommits += 1
                        state.logFailure = nil
                        if let nextEpoch = last.promisedEpoch {
                            state.seal = Seal(segment: open.name, epoch: last.epoch, nextEpoch: nextEpoch, endLSN: endLSN)
                            sealWake.broadcast()
                        }
                        var done: [(any LogCompletionTarget, LogCompletion)] = []
                        while let waiter = state.durabilityWaiters.first, waiter.lsn <= endLSN {
                            _ = state.durabilityWaiters.popFirst()
                            done.append((waiter.target, LogCompletion(token: waiter.token, error: nil)))
                        }
                        return (done, needsPreparedSpare(state))
                    }
                    deliver(completions)
                    if prepare { prepareWake.signal() }
                    writebackWake.signal()
                }
                failing = false
                failingSince = nil
            } catch {
                if failingSince == nil { failingSince = .now }
                let failure = LogEngineError(error, while: "appending to the log of \(directory.path)")
                let failed = monitor.withLock { state -> [Waiter] in
                    state.queue = Array(remaining) + state.queue
                    state.logFailure = failure
                    sealWake.broadcast()
                    return failedWaiters(&state, failure)
                }
                deliver(failed.map { ($0.target, LogCompletion(token: $0.token, error: failure)) })
                failing = true
            }
        }
    }

    /// How long the log writer may gather records nobody waits for, and how many bytes end the wait.
    static let lazyCommitDelay: Duration = .milliseconds(1)
    static let lazyCommitBytes: UInt64 = 1 << 20

    /// Whether the log writer should commit what is queued now rather than gather more.
    func commitDue(_ state: State) -> Bool {
        state.halted || state.stopping || state.queue.isEmpty || !state.durabilityWaiters.isEmpty
            || !state.waitingWrites.isEmpty || state.queuedBytes >= Self.lazyCommitBytes
    }

    /// Stages `group` at the end of the open segment and writes it (direct I/O where the filesystem
    /// allows), adding each record to the history digest. Returns the end of the file's bytes.
    private func append(_ group: ArraySlice<QueuedRecord>, to open: OpenSegment, digest: inout HistoryDigest) throws(SystemError) -> UInt64 {
        var header: [UInt8] = []
        header.reserveCapacity(LogRecordLayout.headerSize)
        var trailer: [UInt8] = []
        trailer.reserveCapacity(LogRecordLayout.trailerSize)
        // The log is durable up to the group's first record: each record says how far before it
        // that is, so a reader can tell bytes a power loss cut out of this commit from damage.
        let commitStart = group.first?.record.lsn ?? 0
        for queued in group {
            var record = queued.record
            record.commitOffset = UInt32(clamping: record.lsn - commitStart)
            header.removeAll(keepingCapacity: true)
            trailer.removeAll(keepingCapacity: true)
            let checksum = record.encodeHeader(into: &header, payloadChecksum: queued.payloadChecksum)
            trailer.appendLittleEndian(checksum)
            header.withUnsafeBytes { digest.add(recordHeader: $0, checksum: checksum) }
            try open.appender.append(header, to: open.file)
            if !record.payload.isEmpty { try open.appender.append(record.payload, to: open.file) }
            try open.appender.append(trailer, to: open.file)
        }
        return try open.appender.flush(to: open.file)
    }

    /// Closes the open segment and starts the next one, whose header chains the history. The next
    /// segment reuses a spare file when there is one: appending over blocks that are already written
    /// makes each group commit's fdatasync a data-only flush, about half the latency of extending a
    /// file (measured: docs/architecture.md).
    private func rotate(from open: OpenSegment, firstLSN: UInt64, epoch: UInt64) throws -> OpenSegment {
        guard let name = SegmentName(sequence: open.name.sequence + 1, host: configuration.host) else {
            throw LogEngineError(errno: EOVERFLOW, "segment numbers are exhausted after \(open.name)")
        }
        if open.fileSize > open.size {
            // A closed segment ends with its last record: no recycled bytes after it.
            try open.file.truncate(to: open.size)
            try open.file.sync()
            monitor.withLock { state in state.segments[state.segments.count - 1].fileSize = open.size }
        }
        let previousDigest = open.digest.finalize()
        let segment: OpenSegment
        if let spare = monitor.withLock({ state in state.spares.popLast() }) {
            do {
                segment = try Self.reuse(
                    spare, as: name, in: directory, appender: open.appender, firstLSN: firstLSN, epoch: epoch, previousDigest: previousDigest
                )
            } catch {
                // Once renamed, the spare is the new segment's file; the retry starts that segment afresh.
                if (try? directory.list().contains(spare.fileName)) ?? true {
                    monitor.withLock { state in state.spares.append(spare) }
                }
                throw error
            }
        } else {
            segment = try Self.startSegment(
                name, in: directory, appender: open.appender, firstLSN: firstLSN, epoch: epoch, previousDigest: previousDigest,
                preallocate: configuration.segmentSize
            )
        }
        monitor.withLock { state in
            state.segments.append(SegmentInfo(name: name, firstLSN: firstLSN, fileSize: segment.fileSize))
        }
        return segment
    }

    /// Creates a segment file holding its header, durable with its directory entry, to be appended
    /// to through `appender`. With `opening` (the epoch record that opens a history or a promoted
    /// primary's epoch), that record follows the header, and both are written under a spare name
    /// that one rename turns into the segment once they are durable: a crash leaves no segment or
    /// the whole opening, never a segment of this epoch without its epoch record.
    static func startSegment(
        _ name: SegmentName, in directory: any StorageDirectory, appender: SegmentAppender, firstLSN: UInt64, epoch: UInt64,
        previousDigest: [UInt8], preallocate: UInt64, opening: LogRecord? = nil
    ) throws(SystemError) -> OpenSegment {
        let header = SegmentHeader(sequence: name.sequence, firstLSN: firstLSN, epoch: epoch, previousDigest: previousDigest)
        let fileName = opening == nil ? name.fileName : sparePrefix + "opening-" + name.fileName
        let file = try directory.open(fileName, create: true, direct: true)
        try file.truncate(to: 0)
        appender.restart()
        try appender.append(header.encoded(), to: file)
        var digest = HistoryDigest(header: header)
        var size = UInt64(SegmentHeader.size)
        if let opening {
            var bytes: [UInt8] = []
            let checksum = opening.encodeHeader(into: &bytes)
            bytes.withUnsafeBytes { digest.add(recordHeader: $0, checksum: checksum) }
            bytes.appendLittleEndian(checksum)
            try appender.append(bytes, to: file)
            size += UInt64(bytes.count)
        }
        let fileSize = try appender.flush(to: file)
        try file.preallocate(preallocate)
        try file.sync()
        if fileName != name.fileName { try directory.rename(fileName, to: name.fileName) }
        try directory.sync()
        return OpenSegment(
            name: name, file: file, appender: appender, header: header, size: size, fileSize: fileSize, digest: digest,
            records: opening == nil ? 0 : 1, overwrites: false
        )
    }

    /// Turns a spare into segment `name`: the new header is written and synced while the file still
    /// has its spare name, then one rename makes it the segment, so a crash leaves either a spare or
    /// a segment with a valid header. The old records after the header carry LSNs of an earlier
    /// part of the history, so no reader takes them for records of this segment (docs/log-format.md).
    static func reuse(
        _ spare: Spare, as name: SegmentName, in directory: any StorageDirectory, appender: SegmentAppender, firstLSN: UInt64,
        epoch: UInt64, previousDigest: [UInt8]
    ) throws(SystemError) -> OpenSegment {
        let header = SegmentHeader(sequence: name.sequence, firstLSN: firstLSN, epoch: epoch, previousDigest: previousDigest)
        let file = try directory.open(spare.fileName, create: false, direct: true)
        appender.restart()
        try appender.append(header.encoded(), to: file)
        let written = try appender.flush(to: file)
        try file.sync()
        try directory.rename(spare.fileName, to: name.fileName)
        try directory.sync()
        return OpenSegment(
            name: name, file: file, appender: appender, header: header, size: UInt64(SegmentHeader.size),
            fileSize: max(spare.size, written), digest: HistoryDigest(header: header), records: 0, overwrites: true
        )
    }

    // MARK: - Writeback thread

    private enum WritebackWork {
        case batch(WritebackBatch)
        case done
        case exit
    }

    /// Writes durable changes to the data device in sorted, coalesced batches (into the page cache;
    /// the checkpointer makes them durable). Retiring a batch frees its memory and admits waiting
    /// writes.
    func writebackLoop() {
        var failed = false
        var retry: WritebackBatch?
        while true {
            if failed {
                monitor.wait(writebackWake, timeout: .seconds(1), until: { $0.halted }, then: { _ in })
            }
            let work: WritebackWork
            if let batch = retry {
                work = monitor.withLock { $0.halted } ? .exit : .batch(batch)
            } else {
                work = monitor.wait(
                    writebackWake,
                    until: { state in
                        // Once the writer is done nothing more becomes durable: changes it gave up
                        // (see `LogEngineConfiguration.stoppingRetryLimit`) stay pending and are never written back.
                        state.halted || (state.pending.oldestLSN.map { $0 < state.durableLSN } ?? false)
                            || (state.stopping && state.writerDone)
                    },
                    then: { state -> WritebackWork in
                        if state.halted { return .exit }
                        if let batch = state.pending.beginWriteback(maxChanges: configuration.writebackBatchChanges, below: state.durableLSN) {
                            return .batch(batch)
                        }
                        return .done
                    }
                )
            }
            switch work {
            case .exit:
                return
            case .done:
                monitor.withLock { state in
                    state.appliedLSN = state.durableLSN
                    state.writebackDone = true
                }
                checkpointWake.signal()
                return
            case .batch(let batch):
                do {
                    retry = batch
                    try apply(batch.pieces)
                    retry = nil
                } catch {
                    let failure = LogEngineError(error, while: "writing back to the data device \(device.name)")
                    let logComplete = monitor.withLock { state in
                        state.writebackFailure = failure
                        if state.stopping && state.writerDone { state.writebackDone = true }
                        return state.writebackDone
                    }
                    // Shutting down with every record durable in the log: recovery finishes the
                    // writeback at the next start, so a failing device cannot hold up `down` or SIGTERM.
                    if logComplete {
                        checkpointWake.signal()
                        return
                    }
                    failed = true
                    continue
                }
                let (acknowledged, urgent, memoryWaiters) = monitor.withLock { state in
                    let memoryWaiters = state.pending.finishWriteback(batch)
                    let acknowledged = admitWaiting(&state)
                    state.appliedLSN = min(state.pending.oldestLSN ?? state.durableLSN, state.durableLSN)
                    state.lastApplied = .now
                    if failed { state.writebackFailure = nil }
                    return (acknowledged, checkpointUrgent(state), memoryWaiters)
                }
                failed = false
                deliver(acknowledged)
                wake(memoryWaiters)
                if urgent { checkpointWake.signal() }
            }
        }
    }

    /// While writes keep coming and the log has room, the checkpointer syncs the device this often.
    /// Each device fdatasync writes every page dirtied since the last one, at random places: under
    /// random writes a page rewritten many times in between is written once (as the kernel's own
    /// 30 s dirty expiry does), where a 5 s interval cost about 15% of 4 KiB write throughput
    /// (BENCHMARKS.md). Recovery replays at most this much more; space pressure checkpoints at once.
    static let checkpointInterval: Duration = .seconds(30)

    /// Space pressure: writes wait for log space, or the log holds half its limit. Retiring
    /// segments is then due at once. (Writes waiting for room in the pending map are not pressure:
    /// a device sync would only slow the writeback they wait for.)
    func checkpointUrgent(_ state: State) -> Bool {
        state.appliedLSN > state.writebackLSN
            && (waitsForLogSpace(state) || state.logBytes > configuration.spaceLimit / 2)
    }

    /// Whether the checkpointer should persist now, `since` the last checkpoint: under space
    /// pressure, when the interval passed, or when writeback has been quiet a second.
    func checkpointDue(_ state: State, since: Duration) -> Bool {
        if hasRetirableSegments(state) { return true }
        guard state.appliedLSN > state.writebackLSN else { return false }
        return checkpointUrgent(state) || since >= Self.checkpointInterval || ContinuousClock.now - state.lastApplied >= .seconds(1)
    }

    /// Whether the segment followed by one starting at `nextFirstLSN` may go: written back up to
    /// `position`, and wholly fetched by every member with a hold, strictly, because a member that
    /// has all of a segment still names it when it asks again after a reconnect (at its end).
    static func retirable(nextFirstLSN: UInt64, position: UInt64, holds: [String: UInt64]) -> Bool {
        nextFirstLSN <= position && holds.values.allSatisfy { nextFirstLSN < $0 }
    }

    /// Whether a segment waits to be retired that a lowered need (a member that fetched it, or left)
    /// now allows, with no new write to start a checkpoint.
    func hasRetirableSegments(_ state: State) -> Bool {
        state.segments.count > 1
            && Self.retirable(nextFirstLSN: state.segments[1].firstLSN, position: state.writebackLSN, holds: state.retentionHolds)
    }

    private enum CheckpointWork {
        case persist(UInt64, final: Bool)
        case wait
        case exit
    }

    /// Makes applied changes durable on the device and stores the position, on its own thread so
    /// the device's fdatasync never stops writeback (which would fill the pending map and stall
    /// the clients), then retires the segments wholly before the position.
    func checkpointLoop() {
        var lastCheckpoint = ContinuousClock.now
        while true {
            let work = monitor.wait(
                checkpointWake, timeout: .seconds(1),
                until: { state in state.halted || state.writebackDone || checkpointDue(state, since: ContinuousClock.now - lastCheckpoint) },
                then: { state -> CheckpointWork in
                    if state.halted { return .exit }
                    if state.writebackDone { return .persist(state.appliedLSN, final: true) }
                    if checkpointDue(state, since: ContinuousClock.now - lastCheckpoint) { return .persist(state.appliedLSN, final: false) }
                    return .wait
                }
            )
            switch work {
            case .exit:
                return
            case .wait:
                continue
            case .persist(let position, let final):
                do {
                    try persist(position)
                    lastCheckpoint = .now
                    if final { return }
                } catch {
                    let failure = LogEngineError(error, while: "syncing the data device \(device.name)")
                    monitor.withLock { $0.writebackFailure = failure }
                    // At shutdown the log holds everything: recovery redoes this at the next start.
                    if final { return }
                    monitor.wait(checkpointWake, timeout: .seconds(1), until: { $0.halted }, then: { _ in })
                }
            }
        }
    }

    /// Writes a batch's pieces in device order; adjacent data pieces go out in one vectored write.
    private func apply(_ pieces: [PendingPiece]) throws(SystemError) {
        var index = 0
        while index < pieces.count {
            switch pieces[index] {
            case .data(let offset, let bytes):
                // Random writes rarely touch: most pieces go out alone, and `run` (empty until a
                // neighbour shows up) allocates nothing for them.
                var run: [ArraySlice<UInt8>] = []
                var end = offset + UInt64(bytes.count)
                index += 1
                while index < pieces.count, case .data(let start, let more) = pieces[index], start == end {
                    if run.isEmpty { run.append(bytes) }
                    run.append(more)
                    end += UInt64(more.count)
                    index += 1
                }
                if run.isEmpty {
                    try device.write(bytes, at: offset)
                } else {
                    try write(run, at: offset)
                }
            case .zeroes(let offset, let length, let keepAllocated):
                try device.zero(offset: offset, length: UInt64(length), keepAllocated: keepAllocated)
                index += 1
            case .device:
                index += 1
            }
        }
    }

    private func write(_ run: [ArraySlice<UInt8>], at offset: UInt64) throws(SystemError) {
        var position = offset
        var start = 0
        while start < run.count {
            let part = run[start..<min(run.count, start + 64)]
            try withBuffers(part, [], { (buffers) throws(SystemError) in try device.write(buffers, at: position) })
            position += UInt64(part.reduce(0) { $0 + $1.count })
            start += part.count
        }
    }

    /// Calls `body` with pointers to all of `slices`, each valid for the whole call.
    func withBuffers(
        _ slices: ArraySlice<ArraySlice<UInt8>>, _ collected: [UnsafeRawBufferPointer],
        _ body: ([UnsafeRawBufferPointer]) throws(SystemError) -> Void
    ) throws(SystemError) {
        guard let first = slices.first else { return try body(collected) }
        var result: Result<Void, SystemError> = .success(())
        first.withUnsafeBytes { bytes in
            result = Result { () throws(SystemError) in try withBuffers(slices.dropFirst(), collected + [bytes], body) }
        }
        try result.get()
    }

    /// Syncs the device, stores the position, and retires the segments wholly before it: up to two
    /// are kept as spares for reuse, the others deleted. Spares count towards the log space and are
    /// deleted as soon as writes wait for log space.
    private func persist(_ position: UInt64) throws(SystemError) {
        try device.sync()
        if position > positionBox.value.writebackLSN {
            // With the epoch, so that the directory can open as a replica's (docs/handover.md §3.2).
            try positionBox.value.store(position, epoch: monitor.withLock { $0.epoch })
        }
        let (doomed, kept, dropped) = monitor.withLock { state -> ([SegmentInfo], [SegmentInfo], [Spare]) in
            state.writebackLSN = position
            var retired: [SegmentInfo] = []
            for index in 0..<max(0, state.segments.count - 1)
            where Self.retirable(nextFirstLSN: state.segments[index + 1].firstLSN, position: position, holds: state.retentionHolds) {
                retired.append(state.segments[index])
            }
            // Spares only while no write waits for log space and the log stays a segment plus a record below its limit.
            let pressure = waitsForLogSpace(state)
                || state.logBytes + configuration.segmentSize + configuration.maxRecordSize > configuration.spaceLimit
            var dropped: [Spare] = []
            if pressure {
                dropped = state.spares
                state.spares = []
            }
            let room = pressure ? 0 : max(0, 2 - state.spares.count)
            return (Array(retired.dropFirst(room)), Array(retired.prefix(room)), dropped)
        }
        guard !doomed.isEmpty || !kept.isEmpty || !dropped.isEmpty else { return }
        var spares: [Spare] = []
        for segment in kept {
            let spare = Spare(fileName: Self.sparePrefix + segment.name.fileName, size: segment.fileSize)
            try directory.rename(segment.name.fileName, to: spare.fileName)
            spares.append(spare)
        }
        for name in doomed.map(\.name.fileName) + dropped.map(\.fileName) {
            do {
                try directory.remove(name)
            } catch {
                if error.errno != ENOENT { throw error }
            }
        }
        try directory.sync()
        let retired = Set((doomed + kept).map(\.name))
        let acknowledged = monitor.withLock { state in
            state.segments.removeAll { retired.contains($0.name) }
            state.spares += spares
            return admitWaiting(&state)
        }
        deliver(acknowledged)
    }
}
