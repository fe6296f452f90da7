import ArgumentParser
import BlockStore
import ControlProtocol
import LogEngine
import TransactionLog

struct LogOptions: ParsableArguments {
    @Option(help: ArgumentHelp("marsd's root directory (marsd --root).", valueName: "path"))
    var root = "/mars"

    @Argument(help: "The resource name.")
    var name: String

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func directory() throws -> any StorageDirectory {
        if let refusal = SafeName.refusal(name, kind: "resource") { throw ValidationError(refusal) }
        do {
            return try POSIXDirectory(path: root + "/resource-" + name)
        } catch {
            throw MarsadmError("cannot open the log of resource '\(name)': \(error). Check --root and the name.")
        }
    }
}

/// What log-dump and log-verify print in JSON.
struct LogReport: Codable {
    struct Record: Codable {
        var lsn: UInt64
        var type: String
        var epoch: UInt64
        var offset: UInt64
        var length: UInt64
        var flags: [String]
        var fileOffset: UInt64
    }

    struct Segment: Codable {
        var name: String
        var sequence: UInt64
        var firstLSN: UInt64
        var endLSN: UInt64
        var epoch: UInt64
        var previousDigest: String
        var digest: String
        var records: Int
        var bytes: UInt64
        /// "end", or "torn-tail at N (defect)": recovery cuts a torn tail off the newest segment.
        var end: String
        var recordList: [Record]?
    }

    var resource: String
    var ok: Bool
    var problem: String?
    /// Where recovery replays from (writeback-position), when the log is intact.
    var writebackLSN: UInt64?
    var segments: [Segment]
    /// The newest segment file when its creation was interrupted (no valid header yet): recovery
    /// removes it.
    var interrupted: String?

    var interruptedNote: String? {
        interrupted.map { "\($0): its creation was interrupted (no valid header yet); recovery removes it" }
    }
}

func hex(_ bytes: [UInt8]) -> String {
    bytes.map { byte in
        let digits = Array("0123456789abcdef")
        return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }.joined()
}

/// Walks the resource's history; a broken history becomes `problem`. With --json a log that
/// cannot be opened is reported as JSON too (and the command still fails).
func report(_ options: LogOptions, withRecords: Bool) throws -> LogReport {
    let directory: any StorageDirectory
    do {
        directory = try options.directory()
    } catch {
        if options.json {
            let report = LogReport(resource: options.name, ok: false, problem: "\(error)", segments: [])
            print((try? ControlCodec.prettyJSON(report)) ?? "")
        }
        throw error
    }
    var records: [String: [LogReport.Record]] = [:]
    var problem: String?
    var walk = HistoryWalk()
    do {
        try LogHistory.walk(directory, into: &walk, visit: { record, segment, offset in
            guard withRecords else { return }
            var flags: [String] = []
            if record.flags.contains(.fua) { flags.append("fua") }
            if record.flags.contains(.noHole) { flags.append("no-hole") }
            records[segment.fileName, default: []].append(
                LogReport.Record(
                    lsn: record.lsn, type: "\(record.type)", epoch: record.epoch, offset: record.offset, length: record.length,
                    flags: flags, fileOffset: offset
                )
            )
        })
    } catch {
        problem = "\(error)"
    }
    var writebackLSN: UInt64?
    if problem == nil {
        do {
            writebackLSN = try LogHistory.verifiedPosition(in: directory, walk: walk)
        } catch {
            problem = "\(error)"
        }
    }
    let segments = walk.segments.map { segment -> LogReport.Segment in
        let end: String
        switch segment.scan.end {
        case .end: end = "end"
        case .tornTail(let offset, let defect): end = "torn-tail at \(offset) (\(defect))"
        case .corrupt(let offset, let defect): end = "corrupt at \(offset) (\(defect))"
        }
        return LogReport.Segment(
            name: segment.name.fileName, sequence: segment.name.sequence, firstLSN: segment.scan.header.firstLSN,
            endLSN: segment.scan.endLSN, epoch: segment.scan.header.epoch, previousDigest: hex(segment.scan.header.previousDigest),
            digest: hex(segment.scan.digest), records: segment.scan.records, bytes: segment.fileSize, end: end,
            recordList: withRecords ? records[segment.name.fileName] ?? [] : nil
        )
    }
    return LogReport(
        resource: options.name, ok: problem == nil, problem: problem, writebackLSN: writebackLSN, segments: segments,
        interrupted: walk.interrupted?.fileName
    )
}

struct LogDump: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the log segments of a resource and every record in them.",
        discussion: "Reads the files under ROOT/resource-NAME; works whether marsd runs or not."
    )

    @OptionGroup var options: LogOptions

    func run() throws {
        let report = try report(options, withRecords: true)
        if options.json {
            print(try ControlCodec.prettyJSON(report))
        } else {
            for segment in report.segments {
                print("\(segment.name): LSN \(segment.firstLSN)..<\(segment.endLSN), epoch \(segment.epoch), \(segment.records) records, \(segment.bytes) bytes, \(segment.end)")
                print("  previous digest \(segment.previousDigest), digest \(segment.digest)")
                for record in segment.recordList ?? [] {
                    let flags = record.flags.isEmpty ? "" : " [" + record.flags.joined(separator: ",") + "]"
                    if record.type == "\(LogRecordType.seal)" {
                        // A seal's offset field is the epoch it promises to the successor.
                        print("  \(record.lsn) seal -> epoch \(record.offset) (ends epoch \(record.epoch)) @\(record.fileOffset)")
                        continue
                    }
                    let range = record.type == "epoch" ? "" : " offset \(record.offset) length \(record.length)"
                    print("  \(record.lsn) \(record.type) epoch \(record.epoch)\(range)\(flags) @\(record.fileOffset)")
                }
            }
            if let note = report.interruptedNote { print(note) }
            if let problem = report.problem { print("PROBLEM: \(problem)") }
        }
        if !report.ok { throw ExitCode(1) }
    }
}

struct LogVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check that a resource's log segments form one intact history.",
        discussion: """
            Verifies every record's checksum and position, the continuity of LSNs across segments, the \
            history digest chain, and that the writeback position lies within the log. Exits with 1 and \
            names the segment and byte offset of the first problem. \
            A torn tail of the newest segment is reported but is not a problem: recovery cuts it.
            """
    )

    @OptionGroup var options: LogOptions

    func run() throws {
        let report = try report(options, withRecords: false)
        if options.json {
            print(try ControlCodec.prettyJSON(report))
        } else if let problem = report.problem {
            print("\(options.name): BROKEN: \(problem)")
        } else {
            let records = report.segments.reduce(0) { $0 + $1.records }
            let first = report.segments.first?.firstLSN ?? 0
            let end = report.segments.last?.endLSN ?? 0
            let position = report.writebackLSN.map { ", written back to \($0)" } ?? ""
            print("\(options.name): OK: \(report.segments.count) segments, \(records) records, LSN \(first)..<\(end)\(position)")
            for segment in report.segments where segment.end != "end" {
                print("\(segment.name): \(segment.end); recovery cuts it")
            }
            if let note = report.interruptedNote { print(note) }
        }
        if !report.ok { throw ExitCode(1) }
    }
}
