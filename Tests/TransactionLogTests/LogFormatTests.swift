import TestSupport
import Testing

@testable import TransactionLog

func randomRecord(lsn: UInt64, using rng: inout SplitMix64) -> LogRecord {
    let type = LogRecordType.allCases.randomElement(using: &rng)!
    let epoch = UInt64.random(in: 1...5, using: &rng)
    switch type {
    case .write:
        let count = Int.random(in: 1...9000, using: &rng)
        let payload = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
        return LogRecord(
            type: .write, flags: Bool.random(using: &rng) ? .fua : [], lsn: lsn, epoch: epoch,
            offset: UInt64.random(in: 0...(1 << 40), using: &rng), length: UInt64(count), payload: payload
        )
    case .trim, .writeZeroes:
        return LogRecord(
            type: type, flags: type == .writeZeroes && Bool.random(using: &rng) ? .noHole : [], lsn: lsn, epoch: epoch,
            offset: UInt64.random(in: 0...(1 << 40), using: &rng), length: UInt64.random(in: 1...(1 << 30), using: &rng)
        )
    case .epoch:
        return LogRecord(type: type, lsn: lsn, epoch: epoch)
    case .seal:
        return LogRecord.seal(lsn: lsn, epoch: epoch, nextEpoch: epoch + UInt64.random(in: 1...3, using: &rng))
    }
}

/// A run of consecutive records starting at `firstLSN`, and their bytes.
func randomLog(count: Int, firstLSN: UInt64 = 1000, seed: UInt64) -> ([LogRecord], [UInt8]) {
    var rng = SplitMix64(state: seed)
    var records: [LogRecord] = []
    var bytes: [UInt8] = []
    var lsn = firstLSN
    for _ in 0..<count {
        let record = randomRecord(lsn: lsn, using: &rng)
        record.encode(into: &bytes)
        records.append(record)
        lsn += UInt64(record.encodedSize)
    }
    return (records, bytes)
}

/// The records `scanRecords` finds in `bytes` and how it ended, through the production window of
/// 1 MiB and through a window of 64 bytes, which puts window edges inside every record; both must agree.
func scan(_ bytes: [UInt8], firstLSN: UInt64 = 1000) -> ([LogRecord], ScanEnd) {
    var results: [([LogRecord], ScanEnd)] = []
    for window in [1 << 20, 64] {
        var records: [LogRecord] = []
        let scan = try! scanRecords(LogBytesInMemory(bytes), firstLSN: firstLSN, window: window) { records.append($0.record) }
        #expect(scan.records == records.count)
        results.append((records, scan.end))
    }
    #expect(results[0].0 == results[1].0 && results[0].1 == results[1].1, "the 64-byte window scanned differently")
    return results[0]
}

@Suite("Transaction log format")
struct LogFormatTests {
    /// The standard CRC32C check value, on the hardware path and through continuation.
    @Test func crc32cCheckValue() {
        let digits = Array("123456789".utf8)
        #expect(CRC32C.checksum(digits) == 0xE306_9283)
        #expect(CRC32C.checksum(Array(digits[4...]), continuing: CRC32C.checksum(Array(digits[..<4]))) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
    }

    /// Every implementation (AVX-512 folding, the interleaved crc32 instruction with three streams
    /// combined by carry-less multiplication, the table) equals a bit-at-a-time reference for every
    /// length around the folding and stream sizes, at every alignment, and when continued from any
    /// split point.
    @Test func crc32cImplementationsAgree() {
        func reference(_ bytes: ArraySlice<UInt8>) -> UInt32 {
            var crc: UInt32 = 0xFFFF_FFFF
            for byte in bytes {
                crc ^= UInt32(byte)
                for _ in 0..<8 { crc = (crc >> 1) ^ (0x82F6_3B78 & (0 &- (crc & 1))) }
            }
            return ~crc
        }
        var random = SplitMix64(state: 42)
        let data = (0..<8200).map { _ in UInt8.random(in: 0...255, using: &random) }
        let lengths = Array(0...80) + Array(240...336) + [383, 384, 385, 511, 512, 513, 767, 768, 3071, 3072, 3073, 4096]
            + [4104, 4111, 4112, 4113, 6144, 8191] + (0..<40).map { _ in Int.random(in: 0...8192, using: &random) }
        for length in lengths {
            let start = Int.random(in: 0...7, using: &random)
            let bytes = Array(data[start..<(start + length)])
            let expected = reference(bytes[...])
            for implementation in ChecksumImplementation.allCases {
                #expect(CRC32C.checksum(bytes, implementation: implementation) == expected, "length \(length) at \(start), \(implementation)")
                let split = Int.random(in: 0...length, using: &random)
                let head = CRC32C.checksum(Array(bytes[..<split]), implementation: implementation)
                #expect(CRC32C.checksum(Array(bytes[split...]), continuing: head, implementation: implementation) == expected)
            }
        }
    }

    /// Combining the checksums of two parts gives the checksum of both, on either implementation,
    /// for every short length (below the hardware path's shortest shift), around the stream sizes,
    /// and with lengths alternating (each thread caches the last length's shift constant).
    @Test func crc32cCombine() {
        var random = SplitMix64(state: 7)
        let data = (0..<9000).map { _ in UInt8.random(in: 0...255, using: &random) }
        let lengths = Array(0...40) + [383, 384, 1024, 3072, 4096, 4096, 65, 4096, 8192, 8999]
            + (0..<40).map { _ in Int.random(in: 0...8999, using: &random) }
        for length in lengths {
            let bytes = data[..<length]
            let expected = CRC32C.checksum(Array(bytes))
            let split = Int.random(in: 0...length, using: &random)
            let first = CRC32C.checksum(Array(bytes[..<split]))
            let second = CRC32C.checksum(Array(bytes[split...]))
            for implementation in ChecksumImplementation.allCases {
                #expect(
                    CRC32C.combine(first, second, secondLength: length - split, implementation: implementation) == expected,
                    "\(length) bytes split at \(split), \(implementation)"
                )
            }
        }
    }

    /// A record's checksum from a payload checksum computed elsewhere equals the CRC32C over its header
    /// and payload, and depends on that payload checksum.
    @Test func recordChecksumFromAPayloadChecksum() {
        var random = SplitMix64(state: 11)
        for index in 0..<200 {
            let record = randomRecord(lsn: UInt64(index) * 10_000, using: &random)
            let payloadChecksum = CRC32C.checksum(record.payload)
            var header: [UInt8] = []
            let checksum = record.encodeHeader(into: &header, payloadChecksum: payloadChecksum)
            #expect(checksum == CRC32C.checksum(header + record.payload))
            var again: [UInt8] = []
            #expect(record.encodeHeader(into: &again, payloadChecksum: payloadChecksum ^ 1) != checksum)
            #expect(again == header)
        }
    }

    /// Every record type round-trips, field for field.
    @Test func roundTrip() throws {
        let (records, bytes) = randomLog(count: 300, seed: 1)
        let (decoded, end) = scan(bytes)
        #expect(decoded == records)
        #expect(end == .end(offset: bytes.count))
    }

    /// Property: for many random logs, encode then scan gives back the same records.
    @Test(arguments: 1...40)
    func roundTripProperty(seed: Int) {
        let (records, bytes) = randomLog(count: 20, seed: UInt64(seed) &* 7919)
        let (decoded, end) = scan(bytes)
        #expect(decoded == records)
        #expect(end == .end(offset: bytes.count))
    }

    /// A large write stays one record (no splitting into pages).
    @Test func largeWriteIsOneRecord() {
        let payload = [UInt8](repeating: 0x5A, count: 4 << 20)
        let record = LogRecord(type: .write, lsn: 0, epoch: 1, offset: 1 << 20, length: UInt64(payload.count), payload: payload)
        let (decoded, _) = scan(record.encoded(), firstLSN: 0)
        #expect(decoded == [record])
    }

    /// Invariant 6: every single-bit flip anywhere in a record is detected; the record is never accepted.
    @Test func everySingleBitFlipIsDetected() {
        let record = LogRecord(type: .write, flags: .fua, lsn: 1000, epoch: 3, offset: 4096, length: 200, payload: (0..<200).map { UInt8($0) })
        let bytes = record.encoded()
        for bit in 0..<(bytes.count * 8) {
            var damaged = bytes
            damaged[bit / 8] ^= 1 << (bit % 8)
            let (decoded, end) = scan(damaged)
            #expect(decoded.isEmpty, "bit \(bit) flipped and the record was accepted")
            guard case .tornTail(0, _) = end else {
                Issue.record("bit \(bit): expected a torn tail at 0, got \(end)")
                continue
            }
        }
    }

    /// The commit offset round-trips, and one that would put the commit before LSN 0 is refused.
    @Test func commitOffsetRoundTrips() {
        for (lsn, commitOffset) in [(UInt64(0), UInt32(0)), (5000, 1), (5000, 5000), (1 << 40, UInt32.max)] {
            let record = LogRecord(type: .trim, lsn: lsn, epoch: 2, offset: 0, length: 4096, commitOffset: commitOffset)
            let (decoded, end) = scan(record.encoded(), firstLSN: lsn)
            #expect(decoded == [record] && end == .end(offset: record.encodedSize))
            #expect(decoded.first?.commitStart == lsn - UInt64(commitOffset))
        }
        let bad = LogRecord(type: .trim, lsn: 10, epoch: 2, offset: 0, length: 4096, commitOffset: 11).encoded()
        guard case .tornTail(0, .invalidField) = scan(bad, firstLSN: 10).1 else {
            Issue.record("a commit offset beyond the LSN was accepted")
            return
        }
    }

    /// Damage followed only by valid records of its own group commit (a power loss that persisted
    /// the commit's blocks out of order) is a torn tail; followed by a record of a later commit, it
    /// is corruption.
    @Test func damageInsideTheLastCommitIsATornTail() {
        var rng = SplitMix64(state: 11)
        var records: [LogRecord] = []
        var bytes: [UInt8] = []
        var lsn: UInt64 = 1000
        var commitStart = lsn
        for index in 0..<10 {
            if index == 0 || index == 4 { commitStart = lsn }  // commits: records 0-3 and 4-9
            var record = randomRecord(lsn: lsn, using: &rng)
            record.commitOffset = UInt32(lsn - commitStart)
            record.encode(into: &bytes)
            records.append(record)
            lsn += UInt64(record.encodedSize)
        }
        func offset(of index: Int) -> Int { records[..<index].reduce(0) { $0 + $1.encodedSize } }
        for victim in [3, 4, 6] {
            var damaged = bytes
            damaged[offset(of: victim) + 20] ^= 0x40
            let (decoded, end) = scan(damaged)
            #expect(decoded == Array(records[..<victim]))
            if victim < 4 {
                #expect(end == .corrupt(offset: offset(of: victim), defect: .checksumMismatch), "victim \(victim)")
            } else {
                #expect(end == .tornTail(offset: offset(of: victim), defect: .checksumMismatch), "victim \(victim)")
            }
        }
    }

    /// A flipped bit in a record followed by valid records is corruption, reported at its offset;
    /// nothing from there on is returned.
    @Test func corruptionInTheMiddleIsReported() {
        let (records, bytes) = randomLog(count: 10, seed: 3)
        let victim = 4
        let offset = records[..<victim].reduce(0) { $0 + $1.encodedSize }
        for bit in [0, 37, 8 * 20 + 3, (offset + records[victim].encodedSize - offset) * 8 - 1] {
            var damaged = bytes
            damaged[offset + bit / 8] ^= 1 << (bit % 8)
            let (decoded, end) = scan(damaged)
            #expect(decoded == Array(records[..<victim]))
            guard case .corrupt(let at, _) = end else { Issue.record("bit \(bit): expected corruption, got \(end)"); continue }
            #expect(at == offset)
        }
    }

    /// Truncation at every byte is recognised: the complete records before the cut are returned and
    /// the rest is a torn tail at the last record boundary (or a clean end exactly at a boundary).
    @Test func truncationAtEveryByte() {
        let (records, bytes) = randomLog(count: 6, seed: 5)
        var boundaries = [0]
        for record in records { boundaries.append(boundaries.last! + record.encodedSize) }
        for cut in 0...bytes.count {
            let (decoded, end) = scan(Array(bytes[..<cut]))
            let complete = boundaries.lastIndex { $0 <= cut }!
            #expect(decoded == Array(records[..<complete]), "cut at \(cut)")
            if boundaries.contains(cut) {
                #expect(end == .end(offset: cut))
            } else {
                #expect(end == .tornTail(offset: boundaries[complete], defect: .incomplete), "cut at \(cut)")
            }
        }
    }

    /// Zero fill after the last record (a preallocated segment) is a clean end.
    @Test func zeroFillIsAnEnd() {
        let (records, bytes) = randomLog(count: 3, seed: 9)
        let (decoded, end) = scan(bytes + [UInt8](repeating: 0, count: 8192))
        #expect(decoded == records)
        #expect(end == .end(offset: bytes.count))
    }

    /// A record from another position of the history (stale bytes) is not taken as the next record.
    @Test func recordAtTheWrongPositionIsNotAccepted() {
        let first = LogRecord(type: .epoch, lsn: 1000, epoch: 1)
        let stale = LogRecord(type: .epoch, lsn: 5000, epoch: 1)
        let (decoded, end) = scan(first.encoded() + stale.encoded())
        #expect(decoded == [first])
        #expect(end == .tornTail(offset: first.encodedSize, defect: .unexpectedPosition(expected: 1052, found: 5000)))
    }

    /// Random bytes never crash the scanner and never yield a record.
    @Test func randomBytesNeverCrash() {
        var rng = SplitMix64(state: 42)
        for _ in 0..<300 {
            let count = Int.random(in: 0..<4096, using: &rng)
            var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if count >= 4, Bool.random(using: &rng) {
                // Plant the magic so deeper fields get exercised too.
                withUnsafeBytes(of: LogRecordLayout.magic.littleEndian) { bytes.replaceSubrange(0..<4, with: $0) }
            }
            let (decoded, _) = scan(bytes)
            #expect(decoded.isEmpty)
        }
    }

    /// Records with inconsistent fields but a correct checksum are refused.
    @Test func inconsistentFieldsAreRefused() {
        let cases = [
            LogRecord(type: .write, lsn: 1000, epoch: 1, offset: 0, length: 10, payload: [1, 2, 3]),
            LogRecord(type: .trim, lsn: 1000, epoch: 1, offset: 0, length: 10, payload: [1]),
            LogRecord(type: .epoch, lsn: 1000, epoch: 1, offset: 4096, length: 0),
            LogRecord(type: .trim, lsn: 1000, epoch: 1, offset: UInt64.max, length: 2),
            LogRecord(type: .seal, lsn: 1000, epoch: 3, offset: 3),  // promises no later epoch
            LogRecord(type: .seal, lsn: 1000, epoch: 3, offset: 4, length: 1),
            LogRecord(type: .seal, lsn: 1000, epoch: 3, offset: 4, length: 1, payload: [7]),
        ]
        for record in cases {
            let (decoded, end) = scan(record.encoded())
            #expect(decoded.isEmpty, "\(record.type) accepted")
            guard case .tornTail(0, .invalidField) = end else { Issue.record("\(record.type): \(end)"); continue }
        }
    }

    /// A seal is 52 bytes, and says which epoch it ends and which it promises.
    @Test func sealRoundTrips() throws {
        let seal = LogRecord.seal(lsn: 1000, epoch: 3, nextEpoch: 4)
        #expect(seal.encoded().count == 52)
        #expect(seal.encoded()[5] == 6)
        let (decoded, end) = scan(seal.encoded())
        #expect(decoded == [seal])
        #expect(end == .end(offset: 52))
        #expect(decoded.first?.promisedEpoch == 4)
        #expect(LogRecord(type: .epoch, lsn: 0, epoch: 4).promisedEpoch == nil)
    }

    /// After a seal only an epoch record of at least the promised epoch, in a later segment, may
    /// follow; everything else is a fork.
    @Test func sealRule() {
        let sealed = SegmentName(sequence: 7, host: "alpha")!
        let next = SegmentName(sequence: 8, host: "beta")!
        let seal = LogRecord.seal(lsn: 1000, epoch: 3, nextEpoch: 4)
        func after(_ record: LogRecord, in segment: SegmentName) -> String? {
            var rule = SealRule()
            #expect(rule.check(seal, in: sealed) == nil)
            #expect(rule.pending == Seal(segment: sealed, epoch: 3, nextEpoch: 4, endLSN: 1052))
            return rule.check(record, in: segment)
        }
        #expect(after(LogRecord(type: .epoch, lsn: 1052, epoch: 4), in: next) == nil)
        #expect(after(LogRecord(type: .epoch, lsn: 1052, epoch: 6), in: next) == nil)
        // The old epoch writing on, in its segment or in another.
        #expect(after(LogRecord(type: .write, lsn: 1052, epoch: 3, offset: 0, length: 1, payload: [1]), in: sealed)?.contains("same segment") == true)
        #expect(after(LogRecord(type: .write, lsn: 1052, epoch: 3, offset: 0, length: 1, payload: [1]), in: next)?.contains("promised epoch 4") == true)
        // An epoch record below the promise, or in the sealed segment; a record of the new epoch without its epoch record.
        #expect(after(LogRecord(type: .epoch, lsn: 1052, epoch: 3), in: next) != nil)
        #expect(after(LogRecord(type: .epoch, lsn: 1052, epoch: 4), in: sealed) != nil)
        #expect(after(LogRecord(type: .write, lsn: 1052, epoch: 4, offset: 0, length: 1, payload: [1]), in: next) != nil)
        // Answered, the rule is done: the new epoch writes on.
        var rule = SealRule()
        _ = rule.check(seal, in: sealed)
        _ = rule.check(LogRecord(type: .epoch, lsn: 1052, epoch: 4), in: next)
        #expect(rule.pending == nil)
        #expect(rule.check(LogRecord(type: .write, lsn: 1104, epoch: 4, offset: 0, length: 1, payload: [1]), in: next) == nil)
    }

    /// Segment names: format, parse, and no path tricks.
    @Test func segmentNames() {
        let name = SegmentName(sequence: 42, host: "host-a.example")
        #expect(name?.fileName == "log-000000042-host-a.example")
        #expect(SegmentName(fileName: "log-000000042-host-a.example") == name)
        #expect(SegmentName(fileName: "log-000000001-h1")! < SegmentName(fileName: "log-000000002-h0")!)
        for bad in ["log-42-h", "log-000000042-", "log-000000042-../x", "log-000000042-a/b", "log-00000004x-h",
                    "log-000000000-h", "xlog-000000001-h", "log-000000001-.hidden", "log-+00000001-h"] {
            #expect(SegmentName(fileName: bad) == nil, "\(bad) accepted")
        }
        #expect(SegmentName(sequence: 1_000_000_000, host: "h") == nil)
    }

    /// Host and resource names: the safe subset, and one refusal text that states the rule.
    @Test func safeNames() {
        for good in ["a", "r0", "db_1.example-2", "_x", String(repeating: "z", count: 64)] {
            #expect(SafeName.isValid(good), "\(good) refused")
            #expect(SafeName.refusal(good, kind: "resource") == nil)
        }
        for bad in ["", ".", "..", ".hidden", "-dash", "a/b", "../etc", "a b", "a\0b", "é", String(repeating: "z", count: 65)] {
            #expect(!SafeName.isValid(bad), "\(bad) accepted")
            #expect(SafeName.refusal(bad, kind: "resource") == "resource name '\(bad)' is not allowed: use \(SafeName.rule)")
        }
        #expect(SafeName.refusal("a/b", kind: "host")?.hasPrefix("host name 'a/b' is not allowed: use 1 to 64 letters") == true)
    }

    /// The segment header round-trips and detects damage.
    @Test func segmentHeader() {
        let header = SegmentHeader(sequence: 7, firstLSN: 123_456, epoch: 3, previousDigest: Array(0..<16))
        let bytes = header.encoded()
        #expect(bytes.count == SegmentHeader.size)
        #expect(bytes.withUnsafeBytes { SegmentHeader.decode($0) } == .success(header))
        for bit in 0..<(bytes.count * 8) {
            var damaged = bytes
            damaged[bit / 8] ^= 1 << (bit % 8)
            guard case .failure = damaged.withUnsafeBytes({ SegmentHeader.decode($0) }) else {
                Issue.record("header bit \(bit) flipped undetected")
                continue
            }
        }
        #expect(Array(bytes[..<30]).withUnsafeBytes { SegmentHeader.decode($0) } == .failure(.incomplete))
    }
}

@Test func headerAndChecksumMatchTheWholeEncoding() {
    var random = SplitMix64(state: 99)
    for size in [0, 1, 4095, 4096, 100_000] {
        let payload = (0..<size).map { _ in UInt8(truncatingIfNeeded: random.next()) }
        let record = LogRecord(
            type: size == 0 ? .trim : .write, lsn: 77, epoch: 3, offset: 4096, length: size == 0 ? 512 : UInt64(size), payload: payload
        )
        var pieces: [UInt8] = []
        let checksum = record.encodeHeader(into: &pieces)
        pieces += payload
        pieces.appendLittleEndian(checksum)
        #expect(pieces == record.encoded())
    }
}
