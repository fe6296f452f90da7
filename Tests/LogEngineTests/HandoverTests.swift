import BlockStore
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

    /// Replay checks the seal rules itself: bytes changed on disk after the receiver checked them
    /// are not applied.
    @Test func replayRefusesARecordAfterASeal() throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        try log.receive(segment: sealedSegment.name, offset: 0, bytes: sealedSegment.bytes)
        try log.commit()
        waitForReplay(log, to: sealedSegment.endLSN)
        log.setReplayPaused(true)
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
