import BlockStore
import TestSupport
import Testing
import TransactionLog

@testable import LogEngine

#if canImport(Glibc)
import Glibc
#endif

/// A primary's segment built record by record, as a replica would fetch it.
struct BuiltSegment {
    var name: SegmentName
    var bytes: [UInt8]
    var endLSN: UInt64
    var digest: [UInt8]

    init(sequence: UInt64, firstLSN: UInt64, epoch: UInt64, previousDigest: [UInt8], records: [LogRecord]) {
        name = SegmentName(sequence: sequence, host: "alpha")!
        let header = SegmentHeader(sequence: sequence, firstLSN: firstLSN, epoch: epoch, previousDigest: previousDigest)
        bytes = header.encoded()
        var history = HistoryDigest(header: header)
        var lsn = firstLSN
        for var record in records {
            record.lsn = lsn
            var encoded: [UInt8] = []
            let checksum = record.encodeHeader(into: &encoded)
            encoded.withUnsafeBytes { history.add(recordHeader: $0, checksum: checksum) }
            encoded += record.payload
            encoded.appendLittleEndian(checksum)
            bytes += encoded
            lsn += UInt64(encoded.count)
        }
        endLSN = lsn
        digest = history.finalize()
    }
}

/// A replica's log on a simulated disk, with a device of 64 KiB.
struct ReplicaFixture {
    let disk = SimulatedDisk()
    static let deviceSize: UInt64 = 64 << 10

    init(startLSN: UInt64 = 0, epoch: UInt64 = 0) throws {
        let device = try disk.directory("dev").open("data", create: true)
        try device.truncate(to: Self.deviceSize)
        try ReplicaLog.create(in: disk.directory("mars"), startLSN: startLSN, epoch: epoch)
    }

    func device() throws -> any StorageFile { try disk.directory("dev").open("data", create: false) }

    func open(paused: Bool = false) throws -> ReplicaLog {
        try ReplicaLog.open(directory: disk.directory("mars"), device: device(), deviceSize: Self.deviceSize, replayPaused: paused, batchBytes: 4096)
    }
}

func write(_ offset: UInt64, _ byte: UInt8, count: Int = 512, epoch: UInt64 = 1) -> LogRecord {
    LogRecord(type: .write, lsn: 0, epoch: epoch, offset: offset, length: UInt64(count), payload: [UInt8](repeating: byte, count: count))
}

/// Waits (bounded) until replay reached `lsn`.
func waitForReplay(_ log: ReplicaLog, to lsn: UInt64) {
    for _ in 0..<10000 {
        if log.status.replayedLSN >= lsn { return }
        usleep(1000)
    }
    Issue.record("replay did not reach \(lsn): \(log.status)")
}

@Suite struct ReplicaLogTests {
    static let first = BuiltSegment(
        sequence: 1, firstLSN: 0, epoch: 1, previousDigest: HistoryDigest.genesis,
        records: [LogRecord(type: .epoch, lsn: 0, epoch: 1)] + (0..<20).map { write(UInt64($0) * 1024, UInt8($0 + 1)) }
    )

    /// Bytes arriving in pieces of any size (records cut anywhere) are checked, appended and
    /// replayed in order; the device ends as the primary's would.
    @Test func replaysFetchedBytesInOrder() throws {
        let seed = TestSeed.make("replaysFetchedBytesInOrder")
        var random = SplitMix64(state: seed)
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        var offset = 0
        while offset < Self.first.bytes.count {
            let count = min(Self.first.bytes.count - offset, SegmentHeader.size + Int(random.next() % 700))
            try log.receive(segment: Self.first.name, offset: UInt64(offset), bytes: Array(Self.first.bytes[offset..<(offset + count)]))
            offset += count
            if random.next() % 3 == 0 { try log.commit() }
        }
        try log.commit()
        waitForReplay(log, to: Self.first.endLSN)
        let device = try fixture.device().read(count: 20 * 1024, at: 0)
        for index in 0..<20 {
            #expect(device[index * 1024] == UInt8(index + 1), "seed \(seed)")
            #expect(device[index * 1024 + 512] == 0)
        }
        #expect(log.status.consistent)
        #expect(log.fetchPosition == FetchPosition(segment: Self.first.name, offset: UInt64(Self.first.bytes.count)))
    }

    /// Invariant 4: a segment whose digest does not chain to this host's history is split brain,
    /// refused before any of its records is kept or applied.
    @Test func aForkedSegmentIsRefused() throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        try log.receive(segment: Self.first.name, offset: 0, bytes: Self.first.bytes)
        try log.segmentEnded(Self.first.name, size: UInt64(Self.first.bytes.count))
        var otherDigest = Self.first.digest
        otherDigest[0] ^= 1
        let forked = BuiltSegment(
            sequence: 2, firstLSN: Self.first.endLSN, epoch: 2, previousDigest: otherDigest,
            records: [LogRecord(type: .epoch, lsn: 0, epoch: 2), write(0, 0xEE, epoch: 2)]
        )
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: forked.name, offset: 0, bytes: forked.bytes) }
        #expect(log.status.fork?.contains("split brain") == true)
        waitForReplay(log, to: Self.first.endLSN)
        #expect(try fixture.device().read(count: 1, at: 0) == [1])
        #expect(!(try fixture.disk.directory("mars").list().contains(forked.name.fileName)))
        // A chained segment after the fork is refused as well: the fork stops the log.
        let chained = BuiltSegment(
            sequence: 2, firstLSN: Self.first.endLSN, epoch: 1, previousDigest: Self.first.digest, records: [write(0, 0x55)]
        )
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: chained.name, offset: 0, bytes: chained.bytes) }
    }

    /// Receives `first` and a segment chained to it (one write of 0x77 at 0), commits, and waits
    /// until both are replayed. Returns the second.
    @discardableResult
    private func replayTwoChainedSegments(_ log: ReplicaLog) throws -> BuiltSegment {
        try log.receive(segment: Self.first.name, offset: 0, bytes: Self.first.bytes)
        let second = BuiltSegment(
            sequence: 2, firstLSN: Self.first.endLSN, epoch: 1, previousDigest: Self.first.digest, records: [write(0, 0x77)]
        )
        try log.receive(segment: second.name, offset: 0, bytes: second.bytes)
        try log.commit()
        waitForReplay(log, to: second.endLSN)
        return second
    }

    /// A segment that continues the history is accepted across the boundary, and the replayed
    /// segment before it is removed.
    @Test func aChainedSegmentContinues() throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        try replayTwoChainedSegments(log)
        #expect(try fixture.device().read(count: 1, at: 0) == [0x77])
        for _ in 0..<1000 where (try fixture.disk.directory("mars").list().contains(Self.first.name.fileName)) { usleep(1000) }
        #expect(!(try fixture.disk.directory("mars").list().contains(Self.first.name.fileName)))
    }

    /// Holds given at open are in force from the first replay: a replica restarted in the middle of
    /// a handover keeps what another member still fetches from it (docs/handover.md §10.2).
    @Test func holdsGivenAtOpenKeepReplayedSegments() throws {
        let fixture = try ReplicaFixture()
        let log = try ReplicaLog.open(
            directory: fixture.disk.directory("mars"), device: fixture.device(), deviceSize: ReplicaFixture.deviceSize, replayPaused: false,
            batchBytes: 4096, retentionHolds: ["gamma": Self.first.endLSN - 1]
        )
        defer { log.shutdown() }
        let second = try replayTwoChainedSegments(log)
        usleep(300_000)
        #expect(try fixture.disk.directory("mars").list().contains(Self.first.name.fileName), "gamma still needs its last record")
        log.setRetentionHolds(["gamma": Self.first.endLSN + 1])
        try log.receive(segment: second.name, offset: UInt64(second.bytes.count), bytes: BuiltSegment(
            sequence: 2, firstLSN: second.endLSN, epoch: 1, previousDigest: second.digest, records: [write(0, 0x78)]
        ).bytes.dropFirst(SegmentHeader.size).map { $0 })
        try log.commit()
        for _ in 0..<1000 where (try fixture.disk.directory("mars").list().contains(Self.first.name.fileName)) { usleep(1000) }
        #expect(!(try fixture.disk.directory("mars").list().contains(Self.first.name.fileName)), "released once gamma has it")
    }

    /// Invariant 6: a damaged record is never written or applied; the error names segment and byte.
    @Test(arguments: [100, 200, 1000, 5000])
    func aDamagedRecordIsNeverApplied(at position: Int) throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        var bytes = Self.first.bytes
        bytes[position] ^= 0x40
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: Self.first.name, offset: 0, bytes: bytes) }
        try? log.commit()
        let status = log.status
        #expect(status.failure?.contains("damaged log in segment \(Self.first.name)") == true)
        usleep(50_000)
        // Only records before the damage may be on the device.
        let damagedRecord = (position - SegmentHeader.size - 52) / (52 + 512)
        let device = try fixture.device().read(count: 20 * 1024, at: 0)
        for index in max(0, damagedRecord)..<20 { #expect(device[index * 1024] == 0) }
    }

    /// A record of an older epoch than the history's (a zombie primary's) is refused as a fork.
    @Test func aRecordOfAnotherEpochIsRefused() throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        let zombie = BuiltSegment(
            sequence: 1, firstLSN: 0, epoch: 1, previousDigest: HistoryDigest.genesis,
            records: [LogRecord(type: .epoch, lsn: 0, epoch: 2), write(0, 9, epoch: 1)]
        )
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: zombie.name, offset: 0, bytes: zombie.bytes) }
        #expect(log.status.fork?.contains("epoch 1") == true)
    }

    /// Bytes that do not start where the local log ends are refused (the fetch resumes at the exact byte).
    @Test func misplacedBytesAreRefused() throws {
        let fixture = try ReplicaFixture()
        let log = try fixture.open()
        defer { log.shutdown() }
        try log.receive(segment: Self.first.name, offset: 0, bytes: Array(Self.first.bytes[0..<200]))
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: Self.first.name, offset: 300, bytes: [1, 2, 3]) }
        #expect(throws: ReplicaLogError.self) { try log.receive(segment: SegmentName(sequence: 5, host: "alpha")!, offset: 64, bytes: [1]) }
        #expect(log.fetchPosition?.offset == 200)
    }

    /// Invariant 3: a crash inside a replay batch (its end stored, the position not) leaves the
    /// replica Inconsistent until replay passes that end; a restart resumes fetch at the exact byte.
    @Test func aCrashInsideABatchIsInconsistentUntilReplayPassesIt() throws {
        let fixture = try ReplicaFixture()
        var log = try fixture.open(paused: true)
        let half = 2000
        try log.receive(segment: Self.first.name, offset: 0, bytes: Array(Self.first.bytes[0..<half]))
        try log.commit()
        log.shutdown()
        // What a crash between storing the intent and the position leaves behind.
        var position = try PositionFile.open(in: fixture.disk.directory("mars"))!
        try position.store(0, intent: 1500, epoch: 0)
        log = try fixture.open(paused: true)
        #expect(!log.status.consistent)
        #expect(log.fetchPosition?.offset ?? 0 <= UInt64(half))
        let resume = Int(log.fetchPosition!.offset)
        try log.receive(segment: Self.first.name, offset: UInt64(resume), bytes: Array(Self.first.bytes[resume...]))
        try log.commit()
        log.setReplayPaused(false)
        waitForReplay(log, to: Self.first.endLSN)
        #expect(log.status.consistent)
        log.shutdown()
    }
}
