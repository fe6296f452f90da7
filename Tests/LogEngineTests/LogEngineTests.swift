import BlockStore
import Dispatch
import Synchronization
import TestSupport
import Testing
import TransactionLog

@testable import LogEngine

#if canImport(Glibc)
import Glibc
#endif

/// Collects completions a test waits for.
final class Completions: LogCompletionTarget {
    private let received = Mutex<[Int: LogEngineError?]>([:])

    func logCompleted(_ completions: [LogCompletion]) {
        received.withLock { map in
            for completion in completions { map[completion.token] = .some(completion.error) }
        }
    }

    func outcome(_ token: Int) -> LogEngineError?? {
        received.withLock { $0[token] }
    }

    /// Waits (bounded) until `token` completed; returns its error, or nil on success.
    func wait(_ token: Int, seconds: Int = 20) -> LogEngineError? {
        for _ in 0..<(seconds * 1000) {
            if let outcome = outcome(token) { return outcome }
            usleep(1000)
        }
        Issue.record("request \(token) did not complete within \(seconds) s")
        return LogEngineError(errno: ETIMEDOUT, "timeout")
    }
}

/// A resource on a simulated disk: the log directory and a data device of `deviceSize` bytes.
struct SimulatedResource {
    let disk = SimulatedDisk()
    let deviceSize: UInt64
    var configuration: LogEngineConfiguration

    /// `spaceLimit` nil: the smallest the configuration allows (no room for spare segments).
    init(
        deviceSize: UInt64 = 256 << 10, segmentSize: UInt64 = 8 << 10, maxRecord: Int = 16 << 10, pending: Int = 32 << 10,
        spaceLimit: UInt64? = nil, sharing pendingMemory: PendingMemory? = nil
    ) throws {
        self.deviceSize = deviceSize
        var configuration = LogEngineConfiguration(host: "hostA")
        configuration.segmentSize = segmentSize
        configuration.maxRecordPayload = maxRecord
        configuration.pendingMemory = pendingMemory ?? PendingMemory(capacity: pending)
        configuration.spaceLimit = spaceLimit ?? 2 * (segmentSize + UInt64(maxRecord + 52))
        self.configuration = configuration
        let device = try disk.directory("dev").open("data", create: true)
        try device.truncate(to: deviceSize)
        try device.sync()
        try disk.directory("dev").sync()
        try LogEngine.create(in: disk.directory("mars"), configuration: configuration, epoch: 1)
    }

    func device() throws -> any StorageFile { try disk.directory("dev").open("data", create: false) }

    func open(
        device: (any StorageFile)? = nil, retentionHolds: [String: UInt64] = [:], report: (String) -> Void = { _ in }
    ) throws -> LogEngine {
        try LogEngine.open(
            directory: disk.directory("mars"), device: device ?? self.device(), deviceSize: deviceSize,
            configuration: configuration, retentionHolds: retentionHolds, report: report
        )
    }
}

/// Waits (bounded) until everything appended is written back.
func waitForWriteback(_ engine: LogEngine) {
    for _ in 0..<20000 {
        let status = engine.status
        if status.writebackLSN == status.appendedLSN, status.pendingChanges == 0 { return }
        usleep(1000)
    }
    Issue.record("writeback did not catch up: \(engine.status)")
}

@Suite struct LogEngineTests {
    /// Both block functions (the CPU's SHA extensions where it has them, and portable C) give the
    /// standard digests, also when the bytes arrive in pieces that straddle blocks.
    @Test(arguments: [ChecksumImplementation.fastest, .portable])
    func sha256MatchesTheStandardVectors(implementation: ChecksumImplementation) {
        func hex(_ bytes: [UInt8]) -> String { bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
        func hash(_ text: String) -> String { hex(SHA256.hash(Array(text.utf8), implementation: implementation)) }
        #expect(hash("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hash("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        #expect(
            hash("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu")
                == "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"
        )
        var hasher = SHA256(implementation: implementation)
        var random = SplitMix64(state: 7)
        var fed = 0
        while fed < 1_000_000 {
            let count = min(1_000_000 - fed, Int.random(in: 0...200, using: &random))
            hasher.update([UInt8](repeating: UInt8(ascii: "a"), count: count))
            fed += count
        }
        #expect(hex(hasher.finalize()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        for length in [55, 56, 63, 64, 65, 119, 120, 128, 1000] {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
            #expect(SHA256.hash(bytes, implementation: implementation) == SHA256.hash(bytes, implementation: .portable))
        }
    }

    @Test func writesReadBackBeforeAndAfterWriteback() throws {
        let resource = try SimulatedResource()
        let gate = ControlledFile(try resource.device())
        gate.control.blocked.withLock { $0 = true }
        let engine = try resource.open(device: gate)
        let target = Completions()
        #expect(engine.submit(offset: 4096, change: .write([UInt8](repeating: 7, count: 8192)), fua: false, target: target, token: 1) == .acknowledged)
        #expect(engine.submit(offset: 6144, change: .writeZeroes(length: 1024, noHole: false), fua: false, target: target, token: 2) == .acknowledged)
        #expect(engine.submit(offset: 0, change: .write([1, 2, 3]), fua: true, target: target, token: 3) == .waiting)
        #expect(target.wait(3) == nil)
        // Held back from the device, but visible to reads.
        let expected = [1, 2, 3] + [UInt8](repeating: 0, count: 4093) + [UInt8](repeating: 7, count: 2048) + [UInt8](repeating: 0, count: 1024)
            + [UInt8](repeating: 7, count: 5120)
        #expect(try engine.read(offset: 0, length: 12288) == expected)
        #expect(try resource.device().read(count: 12288, at: 0) == [UInt8](repeating: 0, count: 12288))
        gate.control.blocked.withLock { $0 = false }
        waitForWriteback(engine)
        #expect(try resource.device().read(count: 12288, at: 0) == expected)
        #expect(try engine.read(offset: 0, length: 12288) == expected)
        let result = engine.shutdown()
        #expect(result.isComplete && result.writebackLSN == result.appendedLSN && result.failure == nil)
    }

    /// A write larger than one record holds is refused whole (a reader would take such a record
    /// for damage); one of exactly the record size is logged.
    @Test func writeLargerThanARecordIsRefused() throws {
        let resource = try SimulatedResource()
        let engine = try resource.open()
        let target = Completions()
        let limit = resource.configuration.maxRecordPayload
        #expect(engine.maxRecordPayload == limit)
        let appendedBefore = engine.status.appendedLSN
        guard case .refused(let error) = engine.submit(offset: 0, change: .write([UInt8](repeating: 1, count: limit + 1)), fua: false, target: target, token: 1) else {
            Issue.record("a write beyond the record size was admitted")
            return
        }
        #expect(error.errno == EINVAL && error.message.contains("\(limit + 1) bytes"), "\(error)")
        #expect(engine.status.appendedLSN == appendedBefore)
        #expect(engine.submit(offset: 0, change: .write([UInt8](repeating: 2, count: limit)), fua: true, target: target, token: 2) == .waiting)
        #expect(target.wait(2) == nil)
        #expect(try engine.read(offset: 0, length: limit + 1) == [UInt8](repeating: 2, count: limit) + [0])
        #expect(engine.shutdown().failure == nil)
    }

    @Test func flushWaitsForTheGroupCommitAndCoversEveryAcknowledgedWrite() throws {
        let resource = try SimulatedResource(segmentSize: 1 << 20, pending: 1 << 20)
        let engine = try resource.open()
        let target = Completions()
        for index in 0..<50 {
            _ = engine.submit(offset: UInt64(index) * 4096, change: .write([UInt8](repeating: UInt8(index), count: 4096)), fua: false, target: target, token: index)
        }
        let flush = engine.flush(target: target, token: 1000)
        if flush == .waiting { #expect(target.wait(1000) == nil) } else { #expect(flush == .acknowledged) }
        let status = engine.status
        #expect(status.durableLSN >= status.appendedLSN)
        #expect(status.groupCommits >= 1)
        engine.shutdown()
    }

    /// Invariant 2: every byte the data device receives is already in a durable log record.
    @Test func nothingReachesTheDeviceBeforeItsRecordIsDurable() throws {
        let resource = try SimulatedResource(segmentSize: 16 << 10, pending: 64 << 10)
        let disk = resource.disk
        let violations = Mutex(0)
        let checked = Mutex(0)
        let device = ControlledFile(try resource.device()) { buffers, offset in
            var data: [UInt8] = []
            for buffer in buffers { data += buffer }
            // Every byte must come from a durable write record (writeback coalesces adjacent records
            // into one device write, so a write may span several).
            var records: [LogRecord] = []
            for name in disk.durableNames(in: "mars") where SegmentName(fileName: name) != nil {
                guard let bytes = disk.durableContent("mars", name), bytes.count >= SegmentHeader.size else { continue }
                let header = try! bytes.withUnsafeBytes { SegmentHeader.decode($0) }.get()
                _ = try! scanRecords(LogBytesInMemory(bytes), from: UInt64(SegmentHeader.size), firstLSN: header.firstLSN) {
                    if $0.record.type == .write { records.append($0.record) }
                }
            }
            records.sort { $0.lsn > $1.lsn }
            var position = offset
            let end = offset + UInt64(data.count)
            var covered = true
            while position < end, covered {
                // The longest run from `position` that some durable record holds.
                var longest: UInt64 = 0
                for record in records where record.offset <= position && position < record.offset + record.length {
                    var length: UInt64 = 0
                    while position + length < min(end, record.offset + record.length),
                        record.payload[Int(position + length - record.offset)] == data[Int(position + length - offset)]
                    {
                        length += 1
                    }
                    longest = max(longest, length)
                }
                covered = longest > 0
                position += longest
            }
            checked.withLock { $0 += 1 }
            if !covered { violations.withLock { $0 += 1 } }
        }
        let engine = try resource.open(device: device)
        let target = Completions()
        var random = SplitMix64(state: 7)
        for token in 0..<300 {
            let length = Int(random.next() % 8 + 1) * 512
            let offset = random.next() % (resource.deviceSize - UInt64(length))
            let bytes = (0..<length).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            if engine.submit(offset: offset, change: .write(bytes), fua: token % 7 == 0, target: target, token: token) == .waiting {
                #expect(target.wait(token) == nil)
            }
        }
        waitForWriteback(engine)
        engine.shutdown()
        #expect(checked.withLock { $0 } > 0)
        #expect(violations.withLock { $0 } == 0)
    }

    /// Power loss at random moments, dropping or keeping (in order, torn) unsynced writes: after
    /// recovery the device equals the replay of a prefix of the log, and that prefix holds every
    /// write acknowledged as durable (invariants 1 and 2). The seed fixes the workload, the moment
    /// and the kind of power loss; the threads' interleaving is the machine's, so a failing seed is
    /// replayed with MARS_TEST_SEED=N and MARS_TEST_REPEAT=50 or so.
    @Test(arguments: TestSeed.list(0..<24)) func powerLossKeepsEveryDurableWrite(seed: UInt64) throws {
        for _ in 0..<TestSeed.repeats {
            TestSeed.announce("powerLossKeepsEveryDurableWrite", seed)
            try powerLossRun(seed: seed, resource: SimulatedResource())
        }
    }

    /// The same with room for spare segments, so segments are recycled: old records behind the
    /// new ones must never be taken for part of the history.
    @Test(arguments: TestSeed.list(100..<116)) func powerLossWithRecycledSegments(seed: UInt64) throws {
        for _ in 0..<TestSeed.repeats {
            TestSeed.announce("powerLossWithRecycledSegments", seed)
            try powerLossRun(seed: seed, resource: SimulatedResource(spaceLimit: 1 << 20))
        }
    }

    private func powerLossRun(seed: UInt64, resource: SimulatedResource) throws {
        var random = SplitMix64(state: 1000 + seed)
        let size = Int(resource.deviceSize)
        var engine = try resource.open()
        let target = Completions()
        enum Op { case write(UInt64, [UInt8]), zero(UInt64, Int) }
        var ops: [Op] = []
        var durableThrough = 0  // every op before this index is durable
        var acknowledged = Set<Int>()
        let count = Int(random.next() % 120) + 10
        for index in 0..<count {
            let length = Int(random.next() % 32 + 1) * 512
            let offset = (random.next() % UInt64(size - length)) & ~511
            let fua = random.next() % 5 == 0
            let op: Op
            let change: LogChange
            if random.next() % 8 == 0 {
                op = .zero(offset, length)
                change = random.next() % 2 == 0 ? .trim(length: length) : .writeZeroes(length: length, noHole: true)
            } else {
                let bytes = (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ index &* 7 &+ 1) }
                op = .write(offset, bytes)
                change = .write(bytes)
            }
            ops.append(op)
            switch engine.submit(offset: offset, change: change, fua: fua, target: target, token: index) {
            case .acknowledged:
                acknowledged.insert(index)
            case .waiting:
                if target.wait(index) == nil {
                    acknowledged.insert(index)
                    if fua { durableThrough = max(durableThrough, index + 1) }
                }
            case .refused(let error):
                Issue.record("refused: \(error)")
            }
            if random.next() % 10 == 0 {
                let covered = (acknowledged.max() ?? -1) + 1
                let token = 10_000 + index
                let result = engine.flush(target: target, token: token)
                if result == .acknowledged || (result == .waiting && target.wait(token) == nil) {
                    durableThrough = max(durableThrough, covered)
                }
            }
        }
        // Let the threads run a little, then cut the power in the middle of whatever they do.
        usleep(UInt32(random.next() % 3000))
        let modes: [SimulatedDisk.PowerLossMode] = [
            .dropUnsynced, .keepRandomPrefix(seed: random.next()), .keepRandomSectors(seed: random.next()),
        ]
        resource.disk.powerLoss(modes[Int(random.next() % 3)])
        engine.halt()

        engine = try resource.open()
        let recovered = try resource.device().read(count: size, at: 0)
        var model = [UInt8](repeating: 0, count: size)
        var matches: [Int] = []
        if model == recovered { matches.append(0) }
        for (index, op) in ops.enumerated() {
            switch op {
            case .write(let offset, let bytes): model.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
            case .zero(let offset, let length): model.replaceSubrange(Int(offset)..<(Int(offset) + length), with: [UInt8](repeating: 0, count: length))
            }
            if model == recovered { matches.append(index + 1) }
        }
        #expect(!matches.isEmpty, "the recovered device is no prefix of the log (seed \(seed))")
        #expect(matches.contains { $0 >= durableThrough }, "durable writes lost: prefixes \(matches), durable through \(durableThrough) (seed \(seed))")
        // The recovered engine serves the same bytes and keeps working.
        #expect(try engine.read(offset: 0, length: size) == recovered)
        #expect(engine.submit(offset: 0, change: .write([9]), fua: true, target: target, token: 99_999) == .waiting)
        #expect(target.wait(99_999) == nil)
        engine.shutdown()
    }

    @Test func tornTailIsCut() throws {
        let resource = try SimulatedResource(pending: 1 << 20)
        var engine = try resource.open()
        let target = Completions()
        #expect(engine.submit(offset: 0, change: .write([UInt8](repeating: 5, count: 4096)), fua: true, target: target, token: 1) == .waiting)
        #expect(target.wait(1) == nil)
        let segment = engine.status.currentSegment
        engine.halt()
        // Half a record at the end: an append the crash interrupted.
        let file = try resource.disk.directory("mars").open(segment, create: false)
        let size = try file.size()
        let torn = LogRecord(type: .write, lsn: 1, epoch: 1, offset: 0, length: 4096, payload: [UInt8](repeating: 6, count: 4096)).encoded()
        try file.write(Array(torn.prefix(1000)), at: size)
        try file.sync()
        var reports: [String] = []
        engine = try resource.open { reports.append($0) }
        #expect(reports.contains { $0.contains("torn tail") && $0.contains(segment) })
        #expect(try engine.read(offset: 0, length: 4096) == [UInt8](repeating: 5, count: 4096))
        engine.shutdown()
    }

    @Test func corruptRecordInTheMiddleKeepsTheResourceDown() throws {
        // Segments large enough that the three records stay in one (no spare is prepared this early).
        let resource = try SimulatedResource(segmentSize: 1 << 20, pending: 1 << 20)
        let engine = try resource.open()
        let target = Completions()
        for token in 0..<3 {
            _ = engine.submit(offset: UInt64(token) * 4096, change: .write([UInt8](repeating: 1, count: 4096)), fua: true, target: target, token: token)
            #expect(target.wait(token) == nil)
        }
        let segment = engine.status.currentSegment
        engine.halt()
        let file = try resource.disk.directory("mars").open(segment, create: false)
        // A bit flip in the payload of the first record: valid records follow it.
        let at = UInt64(SegmentHeader.size + LogRecordLayout.headerSize + 100)
        var byte = try file.read(count: 1, at: at)
        byte[0] ^= 0x10
        try file.write(byte, at: at)
        try file.sync()
        #expect {
            _ = try resource.open()
        } throws: { error in
            guard let error = error as? LogRecoveryError else { return false }
            return error.segment == segment && error.offset == UInt64(SegmentHeader.size)
                && "\(error)".contains("\(segment) at byte \(SegmentHeader.size): damaged record")
        }
    }

    /// A power loss before a group commit's fdatasync returns may persist its blocks in any order:
    /// a hole in the newest commit with its later records intact is a torn tail (nothing in it was
    /// acknowledged as durable), cut there; the same damage in an earlier commit, followed by the
    /// records of a later one, is corruption and keeps the resource down.
    @Test(arguments: [false, true]) func aHoleInTheLastCommitIsATornTail(inEarlierCommit: Bool) throws {
        let resource = try SimulatedResource(segmentSize: 1 << 20, pending: 1 << 20)
        var engine = try resource.open()
        let target = Completions()
        let first = [UInt8](repeating: 1, count: 4096)
        #expect(engine.submit(offset: 0, change: .write(first), fua: true, target: target, token: 0) == .waiting)
        #expect(target.wait(0) == nil)
        // Several writes and one FLUSH: one group commit of several records.
        for token in 1...6 {
            let bytes = [UInt8](repeating: UInt8(token + 1), count: 4096)
            #expect(engine.submit(offset: UInt64(token) * 4096, change: .write(bytes), fua: false, target: target, token: token) == .acknowledged)
        }
        #expect(engine.flush(target: target, token: 100) == .waiting)
        #expect(target.wait(100) == nil)
        let segment = engine.status.currentSegment
        engine.halt()
        var records: [(record: LogRecord, offset: UInt64)] = []
        _ = try LogHistory.walk(resource.disk.directory("mars"), visit: { record, name, offset in
            if name.fileName == segment { records.append((record, offset)) }
        })
        let group = records.filter { $0.record.commitStart == records.last!.record.commitStart }
        try #require(group.count >= 2, "the writes did not share a commit: \(records.map(\.record.commitOffset))")
        // Damage the first record of the last commit, or the record of the commit before it.
        let damaged = inEarlierCommit ? records[records.count - group.count - 1] : group[0]
        let file = try resource.disk.directory("mars").open(segment, create: false)
        try file.write([UInt8](repeating: 0, count: 512), at: damaged.offset + 512)
        try file.sync()
        var reports: [String] = []
        if inEarlierCommit {
            #expect(throws: LogRecoveryError.self) { _ = try resource.open() }
            return
        }
        engine = try resource.open(report: { reports.append($0) })
        #expect(reports.contains { $0.contains("torn tail") }, "\(reports)")
        #expect(try engine.read(offset: 0, length: 4096) == first)
        #expect(engine.status.appendedLSN == damaged.record.lsn)  // cut at the hole; the log goes on from there
        engine.shutdown()
    }

    @Test func segmentsRotateChainAndAreDeletedAfterWriteback() throws {
        let resource = try SimulatedResource(segmentSize: 8 << 10, pending: 1 << 20)
        var engine = try resource.open()
        let target = Completions()
        var sequences = Set<String>()
        for token in 0..<40 {
            _ = engine.submit(offset: UInt64(token % 16) * 4096, change: .write([UInt8](repeating: UInt8(token), count: 4096)), fua: token % 4 == 0, target: target, token: token)
            if token % 4 == 0 { #expect(target.wait(token) == nil) }
            sequences.insert(engine.status.currentSegment)
        }
        waitForWriteback(engine)
        #expect(sequences.count >= 10, "segments rotate by size: \(sequences.sorted())")
        let files = try resource.disk.directory("mars").list().filter { SegmentName(fileName: $0) != nil }
        #expect(files.count <= 2, "written-back segments are deleted: \(files)")
        #expect(try resource.disk.directory("mars").list().filter { $0.hasPrefix("spare-") }.count <= 2)
        #expect(engine.status.logBytes <= resource.configuration.spaceLimit, "spares count towards the log space")
        engine.shutdown()
        // The chain verifies on reopen (a broken previousDigest would stop recovery).
        engine = try resource.open()
        for token in 0..<16 {
            let expected = [UInt8](repeating: UInt8(token < 8 ? token + 32 : token + 16), count: 4096)
            #expect(try engine.read(offset: UInt64(token) * 4096, length: 4096) == expected)
        }
        engine.shutdown()
    }

    @Test func writtenBackSegmentsAreReusedWhenThereIsRoom() throws {
        let resource = try SimulatedResource(segmentSize: 8 << 10, pending: 1 << 20, spaceLimit: 1 << 20)
        var engine = try resource.open()
        let target = Completions()
        var segments = Set<String>()
        for token in 0..<60 {
            _ = engine.submit(offset: UInt64(token % 16) * 4096, change: .write([UInt8](repeating: UInt8(token), count: 4096)), fua: true, target: target, token: token)
            #expect(target.wait(token) == nil)
            segments.insert(engine.status.currentSegment)
            if token % 8 == 7 { waitForWriteback(engine) }
        }
        waitForWriteback(engine)
        let directory = resource.disk.directory("mars")
        let spares = try directory.list().filter { $0.hasPrefix("spare-") }
        #expect(!spares.isEmpty && spares.count <= 2, "spares kept: \(spares)")
        #expect(segments.count >= 20)
        // A reused segment starts with its own header and ends, once closed, with its last record.
        engine.shutdown()
        engine = try resource.open()
        for token in 0..<16 {
            let last = (0..<60).last { $0 % 16 == token }!
            #expect(try engine.read(offset: UInt64(token) * 4096, length: 4096) == [UInt8](repeating: UInt8(last), count: 4096))
        }
        #expect(try directory.list().filter { $0.hasPrefix("spare-") }.isEmpty, "recovery deletes spares")
        engine.shutdown()
    }

    /// Once the open segment is an eighth full, a spare whose every block is written (zeroes) is
    /// prepared, counted in the log space, and the writer leaves the new segment for it at once; an
    /// idle resource and a log without room keep none.
    @Test func aWrittenSpareIsPreparedForTheNextSegment() throws {
        let segmentSize: UInt64 = 64 << 10
        let resource = try SimulatedResource(segmentSize: segmentSize, pending: 1 << 20, spaceLimit: 1 << 20)
        let engine = try resource.open()
        let directory = resource.disk.directory("mars")
        usleep(100_000)
        #expect(try directory.list().filter { $0.hasPrefix("spare-") }.isEmpty, "an idle resource prepares no spare")
        let target = Completions()
        let before = engine.status.logBytes
        #expect(engine.submit(offset: 0, change: .write([UInt8](repeating: 9, count: 12 << 10)), fua: true, target: target, token: 1) == .waiting)
        #expect(target.wait(1) == nil)
        var prepared: [String] = []
        for _ in 0..<2000 where prepared.isEmpty {
            prepared = engine.monitor.withLock { $0.spares.map(\.fileName) }
            usleep(1000)
        }
        #expect(prepared == ["spare-prepared-1"])
        #expect(resource.disk.durableContent("mars", "spare-prepared-1") == [UInt8](repeating: 0, count: Int(segmentSize)))
        #expect(engine.status.logBytes >= before + segmentSize, "the spare counts in the log space")
        // The open segment is a new file (unwritten blocks): the next commit moves on to the spare
        // although the segment is far from full.
        #expect(engine.status.currentSegment == "log-000000002-hostA")
        #expect(engine.submit(offset: 1 << 16, change: .write([UInt8](repeating: 2, count: 4096)), fua: true, target: target, token: 2) == .waiting)
        #expect(target.wait(2) == nil)
        #expect(engine.status.currentSegment == "log-000000003-hostA")
        #expect(!(try directory.list()).contains("spare-prepared-1"), "the spare became a segment")
        #expect(try engine.read(offset: 0, length: 4096) == [UInt8](repeating: 9, count: 4096))
        engine.shutdown()
        // Both segments form one history: recovery replays them.
        let reopened = try resource.open()
        #expect(try reopened.read(offset: 1 << 16, length: 4096) == [UInt8](repeating: 2, count: 4096))
        reopened.shutdown()

        // The smallest log space for 4 KiB records: a spare would need the log to hold at most about
        // one record, and one is only prepared once an eighth of a segment is durable. (With room for
        // 16 KiB records there was a moment early in the segment when a spare fitted, and a slow run
        // caught it.)
        let tight = try SimulatedResource(segmentSize: segmentSize, maxRecord: 4 << 10, pending: 1 << 20)
        let busy = try tight.open()
        for token in 0..<12 {
            _ = busy.submit(offset: UInt64(token) * 4096, change: .write([UInt8](repeating: 1, count: 4096)), fua: true, target: target, token: 100 + token)
            #expect(target.wait(100 + token) == nil)
        }
        usleep(100_000)
        #expect(try tight.disk.directory("mars").list().filter { $0.hasPrefix("spare-") }.isEmpty, "no room for a spare")
        busy.shutdown()
    }

    @Test func brokenHistoryChainStopsRecovery() throws {
        let resource = try SimulatedResource(segmentSize: 8 << 10, pending: 1 << 20)
        let gate = ControlledFile(try resource.device())
        gate.control.failure.withLock { $0 = EIO }  // keeps every segment: nothing is written back
        let engine = try resource.open(device: gate)
        let target = Completions()
        for token in 0..<4 {
            _ = engine.submit(offset: 0, change: .write([UInt8](repeating: 1, count: 4096)), fua: true, target: target, token: token)
            #expect(target.wait(token) == nil)
        }
        engine.halt()
        let directory = resource.disk.directory("mars")
        let segments = try directory.list().filter { SegmentName(fileName: $0) != nil }
        #expect(segments.count >= 3)
        // Rewrite the second segment's header with another previous digest.
        let file = try directory.open(segments[1], create: false)
        var header = try file.read(count: SegmentHeader.size, at: 0).withUnsafeBytes { SegmentHeader.decode($0) }.get()
        header.previousDigest = [UInt8](repeating: 0xAB, count: 16)
        try file.write(header.encoded(), at: 0)
        try file.sync()
        #expect {
            _ = try resource.open()
        } throws: { error in
            (error as? LogRecoveryError)?.segment == segments[1] && "\(error)".contains("history digest")
        }
    }

    /// Invariant 7: a full pending map or log area makes writes wait (not acknowledged), and they
    /// complete once writeback frees room.
    @Test func fullLogMakesWritesWaitUntilWritebackFreesRoom() throws {
        let resource = try SimulatedResource(segmentSize: 8 << 10, maxRecord: 16 << 10, pending: 1 << 20)
        let gate = ControlledFile(try resource.device())
        gate.control.blocked.withLock { $0 = true }
        let engine = try resource.open(device: gate)
        let target = Completions()
        var firstWaiting: Int?
        for token in 0..<40 {
            let result = engine.submit(offset: UInt64(token) * 4096, change: .write([UInt8](repeating: UInt8(token + 1), count: 4096)), fua: false, target: target, token: token)
            if result == .waiting, firstWaiting == nil { firstWaiting = token }
        }
        let waiting = try #require(firstWaiting)
        let status = engine.status
        #expect(status.waitingWrites > 0)
        #expect(status.logBytes <= resource.configuration.spaceLimit)
        usleep(50_000)
        #expect(target.outcome(waiting) == nil, "a write that does not fit is not acknowledged")
        gate.control.blocked.withLock { $0 = false }
        #expect(target.wait(39) == nil)
        waitForWriteback(engine)
        for token in 0..<40 {
            #expect(try resource.device().read(count: 4096, at: UInt64(token) * 4096) == [UInt8](repeating: UInt8(token + 1), count: 4096))
        }
        engine.shutdown()
    }

    /// Invariant 7 across resources: the engines of a host share one pending budget. A write that
    /// waits for memory another engine holds is admitted when that engine writes back, not only
    /// when its own device moves; an engine that holds nothing always takes one change; an engine
    /// that stops gives back what it held.
    @Test func enginesShareOnePendingBudget() throws {
        let change = 4096 + PendingContent.changeOverhead
        let memory = PendingMemory(capacity: 6 * change)
        let first = try SimulatedResource(segmentSize: 1 << 20, sharing: memory)
        let second = try SimulatedResource(segmentSize: 1 << 20, sharing: memory)
        let firstGate = ControlledFile(try first.device())
        let secondGate = ControlledFile(try second.device())
        firstGate.control.blocked.withLock { $0 = true }
        secondGate.control.blocked.withLock { $0 = true }
        let firstEngine = try first.open(device: firstGate)
        let secondEngine = try second.open(device: secondGate)
        let target = Completions()
        func write(_ engine: LogEngine, _ token: Int) -> LogAdmission {
            engine.submit(offset: UInt64(token % 32) * 4096, change: .write([UInt8](repeating: UInt8(token), count: 4096)), fua: false, target: target, token: token)
        }
        for token in 0..<6 { #expect(write(firstEngine, token) == .acknowledged) }
        #expect(write(firstEngine, 6) == .waiting, "the shared budget is full")
        #expect(write(secondEngine, 100) == .acknowledged, "an engine that holds nothing takes one change")
        #expect(write(secondEngine, 101) == .waiting, "the first engine holds the budget")
        #expect(memory.heldBytes == 7 * change)
        usleep(50_000)
        #expect(target.outcome(101) == nil)
        firstGate.control.blocked.withLock { $0 = false }
        #expect(target.wait(101, seconds: 10) == nil, "the first engine's writeback admits the second's write")
        #expect(secondEngine.status.pendingChanges == 2, "the second engine's device has not moved")
        #expect(target.wait(6) == nil)
        waitForWriteback(firstEngine)
        firstEngine.shutdown()
        #expect(memory.heldBytes == 2 * change)
        // The second device fails: its changes stay pending until the engine stops.
        secondGate.control.failure.withLock { $0 = EIO }
        secondGate.control.blocked.withLock { $0 = false }
        secondEngine.halt()
        #expect(memory.heldBytes == 0, "a stopped engine gives back what it held")
    }

    /// Writes waiting for room in the pending map do not make a checkpoint urgent (its device sync
    /// would only slow the writeback they wait for); a write waiting for log space does.
    @Test func onlyWaitingForLogSpaceMakesACheckpointUrgent() throws {
        let resource = try SimulatedResource(pending: 8 << 10, spaceLimit: 1 << 20)
        let engine = try resource.open()
        defer { engine.shutdown() }
        var state = LogEngine.State(
            epoch: 1, nextLSN: 9000, durableLSN: 9000, writebackLSN: 0, pending: PendingWriteMap(capacity: 8 << 10),
            segments: [.init(name: SegmentName(sequence: 1, host: "hostA")!, firstLSN: 0, fileSize: 16 << 10)]
        )
        state.appliedLSN = 9000
        state.waitingWrites.append(
            LogEngine.WaitingWrite(
                offset: 0, change: .write([UInt8](repeating: 1, count: 4096)), payloadChecksum: 0, fua: false, target: Completions(), token: 1
            )
        )
        #expect(!engine.checkpointUrgent(state), "the log has room: the write waits for the pending map")
        state.segments[0].fileSize = (1 << 20) - 1000
        #expect(engine.checkpointUrgent(state), "the write waits for log space")
    }

    /// When the log cannot be written (ENOSPC), FUA writes and flushes fail, new writes are refused,
    /// and nothing acknowledged is lost: once space is back the engine resumes.
    @Test func logWriteFailureRefusesWritesAndResumes() throws {
        let resource = try SimulatedResource(pending: 1 << 20)
        let failing = FileControl()
        let engine = try LogEngine.open(
            directory: ControlledDirectory(inner: resource.disk.directory("mars"), control: failing), device: resource.device(),
            deviceSize: resource.deviceSize, configuration: resource.configuration
        )
        let target = Completions()
        failing.failure.withLock { $0 = ENOSPC }
        #expect(engine.submit(offset: 0, change: .write([UInt8](repeating: 3, count: 4096)), fua: true, target: target, token: 1) == .waiting)
        #expect(target.wait(1)?.errno == ENOSPC)
        guard case .refused(let error) = engine.submit(offset: 8192, change: .write([1]), fua: false, target: target, token: 2) else {
            Issue.record("a write was admitted while the log cannot be written")
            return
        }
        #expect(error.errno == ENOSPC)
        #expect(engine.status.failure != nil)
        failing.failure.withLock { $0 = nil }
        var flushed = false
        for attempt in 0..<50 where !flushed {
            let token = 100 + attempt
            let result = engine.flush(target: target, token: token)
            flushed = result == .acknowledged || (result == .waiting && target.wait(token) == nil)
            if !flushed { usleep(100_000) }
        }
        #expect(flushed)
        waitForWriteback(engine)
        #expect(try resource.device().read(count: 4096, at: 0) == [UInt8](repeating: 3, count: 4096))
        engine.shutdown()
    }

    /// Going down while the log cannot be written ends: after `stoppingRetryLimit` the writer gives
    /// up what was never flushed, and every write acknowledged as durable is still recovered.
    @Test func shutdownEndsWhileTheLogCannotBeWritten() throws {
        var resource = try SimulatedResource(pending: 1 << 20)
        resource.configuration.stoppingRetryLimit = .milliseconds(300)
        let control = FileControl()
        let directory = ControlledDirectory(inner: resource.disk.directory("mars"), control: control)
        var engine = try LogEngine.open(
            directory: directory, device: resource.device(), deviceSize: resource.deviceSize, configuration: resource.configuration
        )
        let target = Completions()
        let durable = [UInt8](repeating: 7, count: 4096)
        #expect(engine.submit(offset: 0, change: .write(durable), fua: true, target: target, token: 1) == .waiting)
        #expect(target.wait(1) == nil)
        control.failure.withLock { $0 = ENOSPC }
        #expect(engine.submit(offset: 8192, change: .write([UInt8](repeating: 8, count: 4096)), fua: false, target: target, token: 2) == .acknowledged)
        #expect(engine.flush(target: target, token: 3) == .waiting)
        #expect(target.wait(3)?.errno == ENOSPC)
        let stopped = Mutex<LogShutdownResult?>(nil)
        DispatchQueue.global().async { [engine] in
            let result = engine.shutdown()
            stopped.withLock { $0 = result }
        }
        for _ in 0..<300 where stopped.withLock({ $0 }) == nil { usleep(50_000) }
        let result = try #require(stopped.withLock { $0 }, "shutdown did not return within 15 s while the log failed")
        // It says so: the acknowledged but never flushed write is given up, not "written back".
        #expect(!result.isComplete)
        #expect(result.givenUp == result.durableLSN..<result.appendedLSN && result.givenUp?.isEmpty == false)
        #expect(result.failure?.contains("appending to the log") == true)
        #expect(result.description.contains("given up"))
        control.failure.withLock { $0 = nil }
        resource.disk.powerLoss()
        engine = try resource.open()
        #expect(try resource.device().read(count: 4096, at: 0) == durable)
        engine.shutdown()
    }

    /// A commit that failed (a write or the fdatasync of the log, while appending or while starting
    /// the next segment) is written again at its own offsets when the log works again: after a
    /// power loss every write acknowledged as durable is still in the log, and the log is intact.
    @Test(arguments: [false, true]) func failedCommitsAreWrittenAgainInPlace(failSyncs: Bool) throws {
        let resource = try SimulatedResource(pending: 1 << 20)
        let control = FileControl()
        func fail(_ errno: Int32?) {
            if failSyncs { control.syncFailure.withLock { $0 = errno } } else { control.failure.withLock { $0 = errno } }
        }
        let directory = ControlledDirectory(inner: resource.disk.directory("mars"), control: control)
        var engine = try LogEngine.open(
            directory: directory, device: resource.device(), deviceSize: resource.deviceSize, configuration: resource.configuration
        )
        let target = Completions()
        var expected = [UInt8](repeating: 0, count: Int(resource.deviceSize))
        var failedAppends = 0
        var failedRotations = 0
        // 8 KiB segments: a failing 7 KiB write never fits behind other records and fails while the
        // next segment starts; a failing 1 KiB one fails in its append. (The writer retries once a second.)
        for index in 0..<40 {
            let fails = index % 4 == 2
            let bytes = [UInt8](repeating: UInt8(index + 1), count: fails && index % 8 == 2 ? 7 << 10 : 1024)
            let offset = index * 1024
            let segment = engine.status.currentSegment
            if fails { fail(EIO) }
            let admission = engine.submit(offset: UInt64(offset), change: .write(bytes), fua: true, target: target, token: index)
            #expect(admission == .waiting)
            if fails {
                #expect(target.wait(index)?.errno == EIO)
                fail(nil)
                var flushed = false
                for attempt in 0..<50 where !flushed {
                    let token = 1000 + 100 * index + attempt
                    let result = engine.flush(target: target, token: token)
                    flushed = result == .acknowledged || (result == .waiting && target.wait(token) == nil)
                    if !flushed { usleep(100_000) }
                }
                try #require(flushed, "the log did not resume after the failure")
                if engine.status.currentSegment == segment { failedAppends += 1 } else { failedRotations += 1 }
            } else {
                #expect(target.wait(index) == nil)
            }
            expected.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        }
        #expect(failedAppends > 0 && failedRotations > 0, "appends \(failedAppends), rotations \(failedRotations)")
        let durable = engine.status.durableLSN
        engine.halt()
        resource.disk.powerLoss()
        var reports: [String] = []
        engine = try resource.open(report: { reports.append($0) })
        let recovered = try resource.device().read(count: expected.count, at: 0) == expected
        #expect(recovered)
        // The log ends exactly where the durable records did: no hole a failed commit left (the
        // newest file may be a reused one, whose earlier bytes recovery cuts off).
        #expect(engine.status.appendedLSN == durable, "\(reports)")
        engine.shutdown()
    }

    /// A spare that was renamed into the next segment before the commit failed (here: the
    /// directory's fsync) is that segment's file now: the retry must not look for it as a spare.
    @Test func aSpareRenamedBeforeAFailureIsNotTakenAgain() throws {
        let resource = try SimulatedResource(pending: 1 << 20, spaceLimit: 1 << 20)
        let control = FileControl()
        let directory = ControlledDirectory(inner: resource.disk.directory("mars"), control: control)
        var engine = try LogEngine.open(
            directory: directory, device: resource.device(), deviceSize: resource.deviceSize, configuration: resource.configuration
        )
        let target = Completions()
        var expected = [UInt8](repeating: 0, count: Int(resource.deviceSize))
        func write(_ index: Int) -> LogEngineError? {
            let bytes = [UInt8](repeating: UInt8(index % 250 + 1), count: 1024)
            let offset = index % 200 * 1024
            guard engine.submit(offset: UInt64(offset), change: .write(bytes), fua: true, target: target, token: index) == .waiting else {
                return LogEngineError(errno: EINVAL, "not waiting")
            }
            // Admitted: a failed commit keeps the record queued, and the next commit that works
            // (the FLUSH below) makes it durable.
            expected.replaceSubrange(offset..<offset + 1024, with: bytes)
            return target.wait(index)
        }
        // Fill a few segments, so that the spare preparer has a spare ready.
        for index in 0..<20 { #expect(write(index) == nil) }
        usleep(200_000)
        control.directorySyncFailure.withLock { $0 = EIO }
        var failed = false
        for index in 20..<60 where !failed { failed = write(index) != nil }
        control.directorySyncFailure.withLock { $0 = nil }
        #expect(failed, "no segment was started while the directory could not be synced")
        var flushed = false
        for attempt in 0..<50 where !flushed {
            let result = engine.flush(target: target, token: 1000 + attempt)
            flushed = result == .acknowledged || (result == .waiting && target.wait(1000 + attempt) == nil)
            if !flushed { usleep(100_000) }
        }
        try #require(flushed, "the log did not resume: \(engine.status.failure ?? "")")
        for index in 60..<80 { #expect(write(index) == nil) }
        engine.halt()
        resource.disk.powerLoss()
        engine = try resource.open()
        let recovered = try resource.device().read(count: expected.count, at: 0) == expected
        #expect(recovered)
        engine.shutdown()
    }

    /// Invariants 4 and 6: recovery checks each segment's place in the history (sequence, first
    /// LSN, digest of the segment before) from its header before it replays any of its records. A
    /// missing segment stops recovery with none of the records after the gap on the device, and
    /// so does a log whose oldest segment starts after the writeback position.
    @Test(arguments: [false, true]) func recoveryReplaysNothingBeyondAGap(removeOldest: Bool) throws {
        let resource = try SimulatedResource(pending: 1 << 20, spaceLimit: 1 << 20)
        let engine = try resource.open()
        let target = Completions()
        for index in 0..<30 {
            let bytes = [UInt8](repeating: UInt8(index + 1), count: 1024)
            #expect(engine.submit(offset: UInt64(index * 1024), change: .write(bytes), fua: true, target: target, token: index) == .waiting)
            #expect(target.wait(index) == nil)
        }
        engine.halt()
        resource.disk.powerLoss()  // the device was never synced: everything is to be replayed
        let directory = resource.disk.directory("mars")
        var offsetsBySegment: [UInt64: [UInt64]] = [:]
        let walk = try LogHistory.walk(directory, visit: { record, segment, _ in
            if record.type == .write { offsetsBySegment[segment.sequence, default: []].append(record.offset) }
        })
        let sequences = walk.segments.map(\.name.sequence)
        try #require(sequences.count >= 4)
        // The oldest segment holds the position; removing it leaves a log that starts after it.
        let removed = removeOldest ? sequences[0] : sequences[2]
        try directory.remove(SegmentName(sequence: removed, host: "hostA")!.fileName)
        #expect(throws: LogRecoveryError.self) { _ = try resource.open() }
        let device = try resource.device()
        for sequence in sequences where sequence > removed {
            for offset in offsetsBySegment[sequence] ?? [] {
                #expect(try device.read(count: 1, at: offset) == [0], "segment \(sequence)'s write at \(offset) was replayed")
            }
        }
    }

    /// A data device that fails cannot hold up shutdown: the log has every record, and the next
    /// start writes them back.
    @Test func shutdownWithAFailingDeviceLeavesTheRestToRecovery() throws {
        let resource = try SimulatedResource(pending: 1 << 20)
        let gate = ControlledFile(try resource.device())
        gate.control.failure.withLock { $0 = EIO }
        var engine = try resource.open(device: gate)
        let target = Completions()
        #expect(engine.submit(offset: 8192, change: .write([UInt8](repeating: 4, count: 4096)), fua: false, target: target, token: 1) == .acknowledged)
        let result = engine.shutdown()
        // The device lacks an acknowledged write, and the result says so (the log holds it).
        #expect(!result.isComplete)
        #expect(result.givenUp == nil)
        #expect(result.notWrittenBack == result.writebackLSN..<result.appendedLSN)
        #expect(result.failure?.contains("writing back to the data device") == true)
        #expect(try resource.device().read(count: 4096, at: 8192) == [UInt8](repeating: 0, count: 4096))
        engine = try resource.open()
        #expect(try resource.device().read(count: 4096, at: 8192) == [UInt8](repeating: 4, count: 4096))
        engine.shutdown()
    }

    @Test func aTornPositionSlotFallsBackToTheOtherOne() throws {
        let disk = SimulatedDisk()
        let directory = disk.directory("mars")
        var position = try PositionFile.create(in: directory)
        try position.store(100)
        try position.store(200)
        let file = try directory.open(PositionFile.name, create: false)
        // Generation 3 (LSN 200) lives in slot 1: damage it.
        try file.write([0xFF, 0xFF], at: 64 + 20)
        #expect(try PositionFile.open(in: directory)?.writebackLSN == 100)
        try file.write([UInt8](repeating: 0, count: 128), at: 0)
        #expect(try PositionFile.open(in: directory) == nil)
    }

    /// Invariant 7: a write that leaves the waiting queue must not stay alive in it (its payload
    /// would be memory that grows with the data written).
    @Test func queuesReleaseWhatLeavesThem() {
        final class Payload: Sendable {}
        var queue = FIFO<Payload>()
        weak var first: Payload?
        do {
            let payload = Payload()
            first = payload
            queue.append(payload)
            queue.append(Payload())
            queue.append(Payload())
        }
        #expect(first != nil)
        _ = queue.popFirst()
        #expect(first == nil)
        #expect(queue.count == 2)
        queue.removeFirst(2)
        #expect(queue.isEmpty)
    }

    @Test func invalidConfigurationsAreRejected() {
        var configuration = LogEngineConfiguration(host: "../etc")
        #expect(configuration.problem != nil)
        configuration = LogEngineConfiguration(host: "a")
        configuration.spaceLimit = configuration.segmentSize
        #expect(configuration.problem?.contains("space limit") == true)
    }
}
