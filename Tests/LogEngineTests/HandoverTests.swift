import BlockStore
import Synchronization
import TestSupport
import Testing
import TransactionLog

@testable import LogEngine

#if canImport(Glibc)
import Glibc
#endif

/// Opens `resource`'s log directory as a replica's (a primary that handed over, docs/handover.md §3.2).
func openAsReplica(_ resource: SimulatedResource) throws -> ReplicaLog {
    try ReplicaLog.open(
        directory: resource.disk.directory("mars"), device: resource.device(), deviceSize: resource.deviceSize, replayPaused: false,
        batchBytes: 4096
    )
}

/// Sends `record` to `log` at its fetch position (with the LSN that position has) and commits it.
func append(_ record: LogRecord, to log: ReplicaLog) throws {
    var record = record
    record.lsn = log.status.fetchedLSN
    let position = try #require(log.fetchPosition)
    try log.receive(segment: position.segment, offset: position.offset, bytes: record.encoded())
    try log.commit()
}

@Suite struct HandoverTests {
    /// A primary's directory, after a clean shutdown or a power loss, opens as a replica that replays
    /// what the device lacks and takes the next record of the same history, but not one of another
    /// epoch: the position file carries the engine's epoch (docs/handover.md §1.2).
    @Test(arguments: [false, true]) func aPrimaryDirectoryOpensAsAReplica(powerLoss: Bool) throws {
        let resource = try SimulatedResource()
        let engine = try resource.open()
        let target = Completions()
        for index in 0..<12 {
            let bytes = [UInt8](repeating: UInt8(index + 1), count: 1024)
            _ = engine.submit(offset: UInt64(index) * 4096, change: .write(bytes), fua: false, target: target, token: index)
        }
        if powerLoss {
            #expect(engine.flush(target: target, token: 100) == .waiting)
            #expect(target.wait(100) == nil)
            resource.disk.powerLoss(.dropUnsynced)
            engine.halt()
        } else {
            #expect(engine.shutdown().isComplete)
        }
        let log = try openAsReplica(resource)
        defer { log.shutdown() }
        waitForReplay(log, to: log.status.fetchedLSN)
        try append(write(0, 0xAA, epoch: 1), to: log)
        waitForReplay(log, to: log.status.fetchedLSN)
        #expect(log.status.failure == nil)
        let device = try resource.device()
        #expect(try device.read(count: 2, at: 0) == [0xAA, 0xAA])
        for index in 1..<12 { #expect(try device.read(count: 1, at: UInt64(index) * 4096) == [UInt8(index + 1)]) }
        #expect(throws: ReplicaLogError.self) { try append(write(4096, 0xBB, epoch: 2), to: log) }
        #expect(log.status.fork != nil)
    }
}

/// A sealed history: epoch 1 with writes, sealed promising epoch 2.
let sealedSegment = BuiltSegment(
    sequence: 1, firstLSN: 0, epoch: 1, previousDigest: HistoryDigest.genesis,
    records: [LogRecord(type: .epoch, lsn: 0, epoch: 1), write(0, 1), write(1024, 2), .seal(lsn: 0, epoch: 1, nextEpoch: 2)]
)

/// The segment after `sealedSegment`, opening with `records`.
func successor(_ records: [LogRecord], epoch: UInt64 = 2) -> BuiltSegment {
    BuiltSegment(sequence: 2, firstLSN: sealedSegment.endLSN, epoch: epoch, previousDigest: sealedSegment.digest, records: records)
}

extension HandoverTests {
    /// Invariant 4 and the seal rules (docs/log-format.md, "The seal"): a record after a seal that
    /// is not an epoch record of at least the promised epoch in a later segment is a fork, refused
    /// by the receiver before anything of it is kept, naming the segment and offset.
    @Test func aRecordAfterASealIsAFork() throws {
        let zombieWrite = write(2048, 0xEE, epoch: 1)
        let cases: [(String, BuiltSegment?, [LogRecord])] = [
            ("same segment", nil, [zombieWrite]),
            ("old epoch, next segment", successor([zombieWrite], epoch: 1), []),
            ("epoch record below the promise", successor([LogRecord(type: .epoch, lsn: 0, epoch: 1)], epoch: 1), []),
            ("new epoch without its epoch record", successor([write(2048, 0xEE, epoch: 2)]), []),
        ]
        for (name, next, sameSegment) in cases {
            let fixture = try ReplicaFixture()
            let log = try fixture.open()
            try log.receive(segment: sealedSegment.name, offset: 0, bytes: sealedSegment.bytes)
            try log.commit()
            let refused: ReplicaLogError
            do {
                if let next {
                    try log.receive(segment: next.name, offset: 0, bytes: next.bytes)
                } else {
                    var bytes: [UInt8] = []
                    for var record in sameSegment {
                        record.lsn = sealedSegment.endLSN
                        record.encode(into: &bytes)
                    }
                    try log.receive(segment: sealedSegment.name, offset: UInt64(sealedSegment.bytes.count), bytes: bytes)
                }
                Issue.record("\(name): accepted")
                log.shutdown()
                continue
            } catch {
                refused = error
            }
            #expect(refused.kind == .fork, "\(name)")
            #expect(refused.offset == (next == nil ? UInt64(sealedSegment.bytes.count) : 64), "\(name)")
            #expect(refused.description.contains("after the seal of epoch 1"), "\(name): \(refused)")
            waitForReplay(log, to: sealedSegment.endLSN)
            #expect(try fixture.device().read(count: 1, at: 2048) == [0], "\(name): applied")
            log.shutdown()
        }
    }

    /// The walk (recovery, `log-verify`, `ReplicaLog.open`) refuses a record after a seal, naming where.
    @Test func theWalkRefusesARecordAfterASeal() throws {
        let disk = SimulatedDisk()
        let zombieWrite = write(2048, 0xEE, epoch: 1)
        for segment in [sealedSegment, successor([zombieWrite], epoch: 1)] {
            let file = try disk.directory("mars").open(segment.name.fileName, create: true)
            try file.write(segment.bytes, at: 0)
        }
        let error = #expect(throws: LogRecoveryError.self) { try LogHistory.walk(disk.directory("mars")) }
        #expect(error?.segment == "log-000000002-alpha")
        #expect(error?.offset == 64)
        #expect(error?.reason.hasPrefix("split brain") == true)
    }

    /// Replay checks the seal rules itself, also when it resumes right after a seal after a
    /// restart: bytes changed on disk after the receiver checked them are not applied.
    @Test(arguments: [false, true]) func replayRefusesARecordAfterASeal(afterRestart: Bool) throws {
        let fixture = try ReplicaFixture()
        var log = try fixture.open()
        defer { log.shutdown() }
        try log.receive(segment: sealedSegment.name, offset: 0, bytes: sealedSegment.bytes)
        try log.commit()
        waitForReplay(log, to: sealedSegment.endLSN)
        log.setReplayPaused(true)
        if afterRestart {
            log.shutdown()
            log = try fixture.open(paused: true)
        }
        let next = successor([LogRecord(type: .epoch, lsn: 0, epoch: 2), LogRecord(type: .trim, lsn: 0, epoch: 2, offset: 0, length: 512)])
        try log.receive(segment: next.name, offset: 0, bytes: next.bytes)
        try log.commit()
        // The same sizes and valid checksums, but the sealed epoch writing on.
        let zombie = successor([LogRecord(type: .epoch, lsn: 0, epoch: 1), LogRecord(type: .trim, lsn: 0, epoch: 1, offset: 0, length: 512)], epoch: 1)
        try fixture.disk.directory("mars").open(next.name.fileName, create: false).write(Array(zombie.bytes[64...]), at: 64)
        log.setReplayPaused(false)
        for _ in 0..<5000 where log.status.failure == nil { usleep(1000) }
        #expect(log.status.fork?.contains("after the seal of epoch 1") == true, "\(log.status)")
        #expect(log.status.replayedLSN == sealedSegment.endLSN)
        #expect(try fixture.device().read(count: 1, at: 0) == [1])
    }
}

// MARK: - Seal, promotion and conversion (docs/handover.md steps H4, H5, H7; §3.1, §3.2)

let handoverReason = "vm1 is being handed over to hostB: this host no longer accepts writes"

/// A primary (hostA) with room for a whole test's writes in one segment, on a device as large as a
/// `ReplicaFixture`'s.
func handoverPrimary() throws -> SimulatedResource {
    try SimulatedResource(deviceSize: ReplicaFixture.deviceSize, segmentSize: 64 << 10)
}

/// Writes `count` records of 1 KiB (byte `index + base` at 4 KiB steps) and returns their tokens'
/// outcomes; every write is acknowledged at admission.
func writeSome(_ engine: LogEngine, count: Int, base: UInt8 = 1, target: Completions = Completions()) {
    for index in 0..<count {
        let bytes = [UInt8](repeating: UInt8(index) &+ base, count: 1024)
        #expect(engine.submit(offset: UInt64(index) * 4096, change: .write(bytes), fua: false, target: target, token: index) == .acknowledged)
    }
}

/// Sends `log` every byte of `source`'s log it lacks, as a fetch would, and commits it.
func ship(_ source: any ShippingSource, to log: ReplicaLog) throws {
    let snapshot = source.shippingSnapshot()
    for (index, segment) in snapshot.segments.enumerated() {
        var offset: UInt64 = 0
        if let position = log.fetchPosition {
            if segment.name.sequence < position.segment.sequence { continue }
            if segment.name.sequence == position.segment.sequence { offset = position.offset }
        }
        let end = snapshot.shippableEnd(of: index)
        guard end > offset else { continue }
        let bytes = try source.logDirectory.open(segment.name.fileName, create: false).read(count: Int(end - offset), at: offset)
        try log.receive(segment: segment.name, offset: offset, bytes: bytes)
        try log.commit()
    }
}

/// A replica on its own disk that holds a copy of `primary`'s history from its first segment on
/// (whose device, like the replica's, is all zeroes there).
func replicaOf(_ primary: LogEngine) throws -> (ReplicaFixture, ReplicaLog) {
    let first = try #require(primary.shippingSnapshot().segments.first)
    let fixture = try ReplicaFixture(startLSN: first.firstLSN, epoch: 1)
    let log = try fixture.open()
    try ship(primary, to: log)
    waitForReplay(log, to: log.status.fetchedLSN)
    return (fixture, log)
}

/// `fixture`'s directory (or `directory` on its disk) opened as `host`'s primary log. A retention
/// hold keeps every segment, so that a test sees the whole history.
func openAsPrimary(
    _ fixture: ReplicaFixture, directory: (any StorageDirectory)? = nil, host: String, promotion: UInt64?,
    report: (String) -> Void = { _ in }
) throws -> LogEngine {
    var configuration = LogEngineConfiguration(host: host)
    configuration.segmentSize = 64 << 10
    configuration.maxRecordPayload = 16 << 10
    configuration.spaceLimit = 2 * (configuration.segmentSize + UInt64(configuration.maxRecordPayload + 52))
    return try LogEngine.open(
        directory: directory ?? fixture.disk.directory("mars"), device: fixture.device(), deviceSize: ReplicaFixture.deviceSize,
        configuration: configuration, retentionHolds: ["hostC": 0], promotion: promotion, report: report
    )
}

/// The records of the log in `directory`, oldest first, with their segments.
func records(in directory: any StorageDirectory) throws -> [(LogRecord, SegmentName)] {
    var found: [(LogRecord, SegmentName)] = []
    _ = try LogHistory.walk(directory, visit: { record, segment, _ in found.append((record, segment)) })
    return found
}

extension HandoverTests {
    /// H4: writes admitted before the seal are in the log, later writes and flushes are refused
    /// with ESHUTDOWN and the daemon's reason, the seal is durable, and nothing follows it: the
    /// segment's file ends with it.
    @Test func sealEndsTheEpoch() throws {
        let resource = try handoverPrimary()
        let engine = try resource.open()
        let target = Completions()
        writeSome(engine, count: 10, target: target)
        #expect(engine.submit(offset: 40960, change: .write([7, 7]), fua: true, target: target, token: 50) == .waiting)
        let appended = engine.status.appendedLSN
        let seal = try engine.seal(nextEpoch: 2, reason: handoverReason)
        #expect(target.wait(50) == nil)
        #expect(seal.epoch == 1 && seal.nextEpoch == 2)
        #expect(seal.endLSN == appended + 52)
        #expect(seal.segment.fileName == engine.status.currentSegment)
        #expect(engine.status.durableLSN == seal.endLSN)
        #expect(engine.submit(offset: 0, change: .write([1]), fua: false, target: target, token: 60) == .refused(LogEngineError(errno: ESHUTDOWN, handoverReason)))
        #expect(engine.flush(target: target, token: 61) == .refused(LogEngineError(errno: ESHUTDOWN, handoverReason)))
        #expect(try engine.seal(nextEpoch: 2, reason: handoverReason) == seal)
        #expect(throws: LogEngineError.self) { try engine.seal(nextEpoch: 3, reason: handoverReason) }
        // Durable as it is now, and the file ends with the seal.
        resource.disk.powerLoss(.dropUnsynced)
        engine.halt()
        let directory = resource.disk.directory("mars")
        let content = try #require(resource.disk.durableContent("mars", seal.segment.fileName))
        var last = try Array(content.suffix(52)).withUnsafeBytes { try decodeRecord($0, at: 0, expectedLSN: seal.endLSN - 52).get() }
        last.commitOffset = 0
        #expect(last == LogRecord.seal(lsn: seal.endLSN - 52, epoch: 1, nextEpoch: 2))
        let walk = try LogHistory.walk(directory)
        #expect(walk.sealed == seal)
        #expect(walk.segments.last?.name == seal.segment)
        let logged = try records(in: directory).map(\.0).filter { $0.type == .write }
        #expect(logged.count == 11)
        #expect(try !directory.list().contains { $0.hasPrefix("spare-") && $0.contains("opening") })
    }

    /// Writes waiting for room when the seal comes were never acknowledged: they are refused with
    /// the seal's reason, and the seal follows the last admitted write.
    @Test func sealRefusesWritesWaitingForRoom() throws {
        let resource = try SimulatedResource(segmentSize: 8 << 10, maxRecord: 16 << 10, pending: 1 << 20)
        let gate = ControlledFile(try resource.device())
        gate.control.blocked.withLock { $0 = true }
        let engine = try resource.open(device: gate, retentionHolds: ["hostB": 0])
        let target = Completions()
        var waiting: [Int] = []
        for token in 0..<40 {
            let bytes = [UInt8](repeating: UInt8(token + 1), count: 4096)
            if engine.submit(offset: UInt64(token) * 4096, change: .write(bytes), fua: false, target: target, token: token) == .waiting {
                waiting.append(token)
            }
        }
        #expect(!waiting.isEmpty)
        let admitted = engine.status.appendedLSN
        let seal = try engine.seal(nextEpoch: 2, reason: handoverReason)
        #expect(seal.endLSN == admitted + 52)
        for token in waiting { #expect(target.wait(token) == LogEngineError(errno: ESHUTDOWN, handoverReason)) }
        gate.control.blocked.withLock { $0 = false }
        #expect(engine.shutdown().isComplete)
        let written = try records(in: resource.disk.directory("mars")).filter { $0.0.type == .write }.count
        #expect(written == 40 - waiting.count)
    }

    /// A seal is refused for an epoch that is not later, and on an engine going down.
    @Test func aSealNeedsALaterEpoch() throws {
        let resource = try handoverPrimary()
        let engine = try resource.open()
        let error = #expect(throws: LogEngineError.self) { try engine.seal(nextEpoch: 1, reason: handoverReason) }
        #expect(error?.errno == EINVAL)
        // Refused, nothing changed: writes go on.
        writeSome(engine, count: 1)
        engine.shutdown()
        #expect(throws: LogEngineError.self) { try engine.seal(nextEpoch: 2, reason: handoverReason) }
    }

    /// §3.1, "A after H4": a log whose last record is a seal opens sealed, after a clean shutdown or
    /// a power loss: no new segment, every request refused, `seal` returns the seal, and it opens
    /// the same way again.
    @Test(arguments: [false, true]) func aSealedLogOpensSealed(powerLoss: Bool) throws {
        let resource = try handoverPrimary()
        var engine = try resource.open()
        writeSome(engine, count: 5)
        let seal = try engine.seal(nextEpoch: 2, reason: handoverReason)
        if powerLoss {
            resource.disk.powerLoss(.keepRandomSectors(seed: 7))
            engine.halt()
        } else {
            #expect(engine.shutdown().isComplete)
        }
        let segments = try resource.disk.directory("mars").list().filter { SegmentName(fileName: $0) != nil }
        for _ in 0..<2 {
            var reported: [String] = []
            engine = try resource.open(report: { reported.append($0) })
            #expect(reported.contains { $0.contains("sealed") })
            #expect(engine.status.currentSegment == seal.segment.fileName)
            #expect(engine.status.appendedLSN == seal.endLSN)
            guard case .refused(let error) = engine.submit(offset: 0, change: .write([1]), fua: false, target: Completions(), token: 1)
            else {
                Issue.record("a sealed log admitted a write")
                return
            }
            #expect(error.errno == ESHUTDOWN)
            #expect(error.message.contains("sealed"))
            #expect(try engine.seal(nextEpoch: 2, reason: handoverReason) == seal)
            #expect(engine.shutdown().isComplete)
            #expect(try resource.disk.directory("mars").list().filter { SegmentName(fileName: $0) != nil } == segments)
        }
        for index in 0..<5 { #expect(try resource.device().read(count: 1, at: UInt64(index) * 4096) == [UInt8(index + 1)]) }
    }
}

extension HandoverTests {
    /// H5 and §3.2: a sealed primary's directory converts to a replica's (position with the epoch
    /// from the walk, even from a position file that says 0), whose fetch continues in the sealed
    /// segment; and back: a retake promotes it to a later epoch than the seal promised.
    @Test func aSealedPrimaryConvertsToAReplicaAndBack() throws {
        let resource = try handoverPrimary()
        let engine = try resource.open()
        writeSome(engine, count: 6)
        let seal = try engine.seal(nextEpoch: 2, reason: handoverReason)
        #expect(engine.shutdown().isComplete)
        let directory = resource.disk.directory("mars")
        // A position file as an older version wrote it.
        var position = try #require(try PositionFile.open(in: directory))
        try position.store(position.writebackLSN, epoch: 0)

        let end = try LogEngine.convertToReplica(directory: directory, host: "hostA")
        #expect(end == LogEnd(lsn: seal.endLSN, epoch: 1, segment: seal.segment, seal: seal))
        #expect(try PositionFile.open(in: directory)?.epoch == 1)
        #expect(try LogEngine.convertToReplica(directory: directory, host: "hostA") == end)
        let replica = try openAsReplica(resource)
        let size = try directory.open(seal.segment.fileName, create: false).size()
        #expect(replica.fetchPosition == FetchPosition(segment: seal.segment, offset: size))
        #expect(replica.status.epoch == 1)
        #expect(replica.status.fetchedLSN == seal.endLSN)
        // The sealed epoch writing on is a fork here too.
        #expect(throws: ReplicaLogError.self) { try append(write(0, 0xEE, epoch: 1), to: replica) }
        replica.shutdown()

        // Back (a retake after the successor died): not below the promise, then past it.
        var configuration = resource.configuration
        let refused = #expect(throws: LogEngineError.self) {
            try LogEngine.open(directory: directory, device: resource.device(), deviceSize: resource.deviceSize, configuration: configuration, promotion: 1)
        }
        #expect(refused?.errno == EINVAL)
        configuration.host = "hostA"
        let retaken = try LogEngine.open(
            directory: directory, device: resource.device(), deviceSize: resource.deviceSize, configuration: configuration, promotion: 3
        )
        #expect(retaken.status.epoch == 3)
        let target = Completions()
        #expect(retaken.submit(offset: 0, change: .write([9]), fua: true, target: target, token: 1) == .waiting)
        #expect(target.wait(1) == nil)
        #expect(retaken.shutdown().isComplete)
        #expect(try resource.device().read(count: 2, at: 0) == [9, 1])
        let epochs = try records(in: directory).filter { $0.0.type == .epoch }.map(\.0.epoch)
        #expect(epochs.last == 3)
    }

    /// §3.2, last bullet: a segment the primary's recovery started and never wrote to is removed by
    /// the conversion, so the successor's segment of that sequence does not stand next to it.
    @Test func theConversionRemovesAnEmptyTrailingSegment() throws {
        let resource = try handoverPrimary()
        var engine = try resource.open(retentionHolds: ["hostB": 0])
        writeSome(engine, count: 3)
        #expect(engine.shutdown().isComplete)
        engine = try resource.open(retentionHolds: ["hostB": 0])
        let empty = engine.status.currentSegment
        #expect(engine.shutdown().isComplete)
        let directory = resource.disk.directory("mars")
        #expect(try directory.list().contains(empty))
        var reported: [String] = []
        let end = try LogEngine.convertToReplica(directory: directory, host: "hostA", report: { reported.append($0) })
        #expect(try !directory.list().contains(empty))
        #expect(reported.contains { $0.contains(empty) })
        #expect(end.segment != nil && end.segment?.fileName != empty)
        let replica = try openAsReplica(resource)
        #expect(replica.fetchPosition?.segment == end.segment)
        replica.shutdown()
        // A segment of another host is the history's, not this host's leftover: it stays.
        #expect(try LogEngine.convertToReplica(directory: directory, host: "hostB").segment == end.segment)
    }

    /// H7: a replica holding the sealed history is promoted to the promised epoch: its new segment
    /// is `log-<N+1>-hostB` at the seal's end, in the new epoch, chained to the sealed history and
    /// opened by an epoch record; a third replica that holds the old history takes it. Opening
    /// with the same promotion again promotes nothing twice; a lower epoch is refused.
    @Test func promotionStartsTheNextEpoch() throws {
        let resource = try handoverPrimary()
        let primary = try resource.open()
        writeSome(primary, count: 8)
        let seal = try primary.seal(nextEpoch: 2, reason: handoverReason)
        let (fixtureB, replicaB) = try replicaOf(primary)
        let (fixtureC, replicaC) = try replicaOf(primary)
        defer { replicaC.shutdown() }
        #expect(primary.shutdown().isComplete)
        replicaB.shutdown()

        let promoted = try openAsPrimary(fixtureB, host: "hostB", promotion: 2)
        let name = try #require(SegmentName(sequence: seal.segment.sequence + 1, host: "hostB"))
        #expect(promoted.status.currentSegment == name.fileName)
        #expect(promoted.status.epoch == 2)
        #expect(promoted.status.durableLSN == seal.endLSN + 52)
        let walk = try LogHistory.walk(fixtureB.disk.directory("mars"))
        let newSegment = try #require(walk.segments.last)
        let sealedDigest = try #require(try LogHistory.walk(resource.disk.directory("mars")).segments.last?.scan.digest)
        #expect(newSegment.scan.header == SegmentHeader(sequence: name.sequence, firstLSN: seal.endLSN, epoch: 2, previousDigest: sealedDigest))
        #expect(walk.epochStarts.last == EpochStart(epoch: 2, lsn: seal.endLSN, segment: name))
        writeSome(promoted, count: 3, base: 0x40)
        let target = Completions()
        #expect(promoted.flush(target: target, token: 99) == .waiting)
        #expect(target.wait(99) == nil)

        try ship(promoted, to: replicaC)
        #expect(replicaC.status.fork == nil)
        waitForReplay(replicaC, to: promoted.status.durableLSN)
        #expect(replicaC.status.epoch == 2)
        #expect(try fixtureC.device().read(count: 1, at: 0) == [0x40])
        #expect(promoted.shutdown().isComplete)

        for _ in 0..<2 {
            let again = try openAsPrimary(fixtureB, host: "hostB", promotion: 2)
            #expect(again.status.epoch == 2)
            #expect(again.shutdown().isComplete)
        }
        let epochRecords = try records(in: fixtureB.disk.directory("mars")).filter { $0.0.type == .epoch }
        #expect(epochRecords.map(\.0.epoch) == [2])
        for lower in [UInt64(1), 2] {
            // 2 is refused on another host: its history is at 2 already, and that epoch was not its own.
            let error = #expect(throws: LogEngineError.self) { try openAsPrimary(fixtureB, host: "hostC", promotion: lower) }
            #expect(error?.errno == EINVAL)
        }
    }
}

/// A directory whose files and names take `budget` more changes (writes, syncs, truncations,
/// renames, removals, creations); the next one fails as if the power went out there.
struct CrashingDirectory: StorageDirectory {
    let inner: any StorageDirectory
    let budget: Budget

    final class Budget: Sendable {
        let left: Mutex<Int>
        init(_ changes: Int) { left = Mutex(changes) }
        func spend(_ what: String) throws(SystemError) {
            let allowed = left.withLock { left -> Bool in
                left -= 1
                return left >= 0
            }
            if !allowed { throw SystemError(what, "the simulated power loss", errno: EIO) }
        }
        var exhausted: Bool { left.withLock { $0 < 0 } }
    }

    final class File: StorageFile {
        let inner: any StorageFile
        let budget: Budget
        init(_ inner: any StorageFile, _ budget: Budget) {
            self.inner = inner
            self.budget = budget
        }
        var name: String { inner.name }
        func size() throws(SystemError) -> UInt64 { try inner.size() }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
            try inner.read(into: buffer, at: offset)
        }
        func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SystemError) {
            try budget.spend("write")
            try inner.write(buffers, at: offset)
        }
        func sync() throws(SystemError) {
            try budget.spend("fdatasync")
            try inner.sync()
        }
        func truncate(to size: UInt64) throws(SystemError) {
            try budget.spend("truncate")
            try inner.truncate(to: size)
        }
        func preallocate(_ length: UInt64) throws(SystemError) {
            try budget.spend("fallocate")
            try inner.preallocate(length)
        }
        func zero(offset: UInt64, length: UInt64, keepAllocated: Bool) throws(SystemError) {
            try budget.spend("zero")
            try inner.zero(offset: offset, length: length, keepAllocated: keepAllocated)
        }
    }

    var path: String { inner.path }
    func list() throws(SystemError) -> [String] { try inner.list() }
    func open(_ name: String, create: Bool, direct: Bool) throws(SystemError) -> any StorageFile {
        if create { try budget.spend("create") }
        return File(try inner.open(name, create: create, direct: direct), budget)
    }
    func remove(_ name: String) throws(SystemError) {
        try budget.spend("unlink")
        try inner.remove(name)
    }
    func rename(_ from: String, to: String) throws(SystemError) {
        try budget.spend("rename")
        try inner.rename(from, to: to)
    }
    func sync() throws(SystemError) {
        try budget.spend("fsync")
        try inner.sync()
    }
}

extension HandoverTests {
    /// §3.1, "B in H7": a power loss at each change the promotion makes leaves the sealed log or
    /// the promoted one, never a broken log or a segment of the new epoch without its epoch
    /// record; opening with the promotion again then ends promoted, with one epoch record.
    @Test func aPowerLossDuringPromotionLeavesTheOldLogOrTheNew() throws {
        let seed = TestSeed.make("aPowerLossDuringPromotionLeavesTheOldLogOrTheNew")
        var random = SplitMix64(state: seed)
        var changes = 0
        var sawOld = false
        var sawNew = false
        while true {
            let resource = try handoverPrimary()
            let primary = try resource.open()
            writeSome(primary, count: 4)
            let seal = try primary.seal(nextEpoch: 2, reason: handoverReason)
            let (fixture, replica) = try replicaOf(primary)
            replica.shutdown()
            primary.shutdown()
            let budget = CrashingDirectory.Budget(changes)
            let crashing = CrashingDirectory(inner: fixture.disk.directory("mars"), budget: budget)
            do {
                try openAsPrimary(fixture, directory: crashing, host: "hostB", promotion: 2).shutdown()
                if !budget.exhausted { break }
            } catch {
                #expect(budget.exhausted, "\(error) (seed \(seed))")
            }
            let modes: [SimulatedDisk.PowerLossMode] = [.dropUnsynced, .keepRandomPrefix(seed: random.next()), .keepRandomSectors(seed: random.next())]
            fixture.disk.powerLoss(modes[Int(random.next() % 3)])
            let directory = fixture.disk.directory("mars")
            let walk = try LogHistory.walk(directory)
            if walk.epoch == 1 {
                #expect(walk.sealed == seal, "after \(changes) changes (seed \(seed))")
                sawOld = true
            } else {
                #expect(walk.epoch == 2)
                let start = try #require(walk.epochStarts.last)
                #expect(start.segment.host == "hostB" && start.lsn == seal.endLSN, "after \(changes) changes (seed \(seed))")
                sawNew = true
            }
            let promoted = try openAsPrimary(fixture, host: "hostB", promotion: 2)
            let target = Completions()
            #expect(promoted.submit(offset: 0, change: .write([5]), fua: true, target: target, token: 1) == .waiting)
            #expect(target.wait(1) == nil)
            #expect(promoted.shutdown().isComplete)
            #expect(try records(in: directory).filter { $0.0.type == .epoch }.map(\.0.epoch) == [2], "after \(changes) changes (seed \(seed))")
            #expect(try fixture.device().read(count: 2, at: 0) == [5, 1])
            changes += 1
        }
        #expect(sawOld && sawNew, "seed \(seed)")
        print("aPowerLossDuringPromotionLeavesTheOldLogOrTheNew: \(changes) crash points (seed \(seed))")
    }

    /// The whole handover on the log side: A writes and seals; its directory becomes a replica's;
    /// B, a replica with a copy of A's history, is promoted to the promised epoch and writes; A's
    /// replica takes B's new segment and records and replays them, and both devices are equal.
    @Test func handoverEndToEnd() throws {
        let resource = try handoverPrimary()
        let engineA = try resource.open()
        writeSome(engineA, count: 12)
        let (fixtureB, replicaB) = try replicaOf(engineA)
        writeSome(engineA, count: 4, base: 0x20)
        let seal = try engineA.seal(nextEpoch: 2, reason: handoverReason)
        try ship(engineA, to: replicaB)
        waitForReplay(replicaB, to: seal.endLSN)
        #expect(engineA.shutdown().isComplete)
        replicaB.shutdown()

        let end = try LogEngine.convertToReplica(directory: resource.disk.directory("mars"), host: "hostA")
        #expect(end.seal == seal)
        let replicaA = try openAsReplica(resource)
        defer { replicaA.shutdown() }

        let engineB = try openAsPrimary(fixtureB, host: "hostB", promotion: end.seal!.nextEpoch)
        writeSome(engineB, count: 9, base: 0x60)
        #expect(engineB.submit(offset: 60_000, change: .trim(length: 4096), fua: false, target: Completions(), token: 100) == .acknowledged)
        let target = Completions()
        #expect(engineB.flush(target: target, token: 1) == .waiting)
        #expect(target.wait(1) == nil)
        try ship(engineB, to: replicaA)
        #expect(engineB.shutdown().isComplete)
        waitForReplay(replicaA, to: engineB.status.durableLSN)
        #expect(replicaA.status.failure == nil && replicaA.status.fork == nil)
        #expect(replicaA.status.epoch == 2)
        let size = Int(ReplicaFixture.deviceSize)
        #expect(try resource.device().read(count: size, at: 0) == fixtureB.device().read(count: size, at: 0))
        #expect(try resource.device().read(count: 1, at: 0) == [0x60])
    }
}

extension HandoverTests {
    /// Invariant 5 on the log side (docs/handover.md §4.2): a fenced engine refuses writes and
    /// flushes with EIO, fails the FUA writes, flushes and writes that wait, and still appends and
    /// writes back what it had acknowledged.
    @Test func fencedEngineRefusesAndFailsWaiters() throws {
        let resource = try SimulatedResource(segmentSize: 64 << 10, pending: 16 << 10)
        let logControl = FileControl()
        let engine = try LogEngine.open(
            directory: ControlledDirectory(inner: resource.disk.directory("mars"), control: logControl), device: resource.device(),
            deviceSize: resource.deviceSize, configuration: resource.configuration
        )
        logControl.blocked.withLock { $0 = true }
        let target = Completions()
        var acknowledged: [Int] = []
        var waiting: [Int] = []
        for token in 0..<8 {
            let bytes = [UInt8](repeating: UInt8(token + 1), count: 4096)
            switch engine.submit(offset: UInt64(token) * 4096, change: .write(bytes), fua: token == 0, target: target, token: token) {
            case .acknowledged: acknowledged.append(token)
            case .waiting: waiting.append(token)
            case .refused(let error): Issue.record("refused: \(error)")
            }
        }
        #expect(engine.flush(target: target, token: 100) == .waiting)
        #expect(waiting.contains(0) && waiting.count > 1, "a FUA write and writes waiting for room")
        engine.fence(epoch: 3, by: "hostB")
        for token in waiting + [100] {
            let error = target.wait(token)
            #expect(error?.errno == EIO)
            #expect(error?.message.hasPrefix("fenced: hostB is primary at epoch 3") == true)
        }
        guard case .refused(let refused) = engine.submit(offset: 0, change: .write([1]), fua: false, target: target, token: 200) else {
            Issue.record("a fenced engine admitted a write")
            return
        }
        #expect(refused.errno == EIO)
        guard case .refused = engine.flush(target: target, token: 201) else {
            Issue.record("a fenced engine took a flush")
            return
        }
        // What it acknowledged still goes to its log and device.
        logControl.blocked.withLock { $0 = false }
        waitForWriteback(engine)
        #expect(engine.shutdown().isComplete)
        for token in acknowledged {
            #expect(try resource.device().read(count: 1, at: UInt64(token) * 4096) == [UInt8(token + 1)])
        }
    }
}
