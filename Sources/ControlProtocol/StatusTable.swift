/// The human-readable form of `marsadm view`.
public enum StatusTable {
    public static func render(_ status: DaemonStatus) -> String {
        var lines = [
            "marsd \(status.version) pid \(status.pid), I/O engine \(status.ioEngine)",
            "listening on \(status.listeners.joined(separator: ", "))",
        ]
        if let root = status.root {
            lines.append("root \(root), " + (status.host.map { "host \($0), cluster \(status.cluster ?? "?")" } ?? "no cluster yet (marsadm create-cluster)"))
        }
        if !status.resources.isEmpty {
            let header = ["RESOURCE", "ROLE", "WANTED", "STATE", "EPOCH", "APPENDED", "DURABLE", "WRITTEN-BACK", "PENDING", "LOG", "SEGMENT"]
            var rows = [header]
            for resource in status.resources {
                let log = resource.log
                rows.append([
                    resource.name, resource.role, resource.wanted, resource.state,
                    log.map { "\($0.epoch)" } ?? "-", log.map { "\($0.appendedLSN)" } ?? "-", log.map { "\($0.durableLSN)" } ?? "-",
                    log.map { "\($0.writebackLSN)" } ?? "-", log.map { formatBytes(UInt64($0.pendingBytes)) } ?? "-",
                    log.map { formatBytes($0.logBytes) + "/" + formatBytes($0.spaceLimit) } ?? "-", log?.currentSegment ?? "-",
                ])
            }
            lines += table(rows)
            let replicated = status.resources.filter { $0.replication != nil }
            if !replicated.isEmpty {
                var rows = [["RESOURCE", "HOST", "ROLE", "DISK", "REPLICATION", "FETCHED", "REPLAYED", "LAG", "AGE"]]
                for resource in replicated {
                    let replication = resource.replication!
                    for member in replication.members {
                        let lag = member.role == "primary" ? "-"
                            : replication.members.first { $0.role == "primary" }.map { primary in
                                formatBytes(primary.fetchedLSN > member.replayedLSN ? primary.fetchedLSN - member.replayedLSN : 0)
                            } ?? "?"
                        rows.append([
                            resource.name, member.host + (member.host == status.host ? "*" : ""), member.role, member.disk, member.replication,
                            "\(member.fetchedLSN)", "\(member.replayedLSN)", lag, String(format1: member.age) + "s",
                        ])
                    }
                }
                lines.append("replication (* this host; other hosts as last gossiped):")
                lines += table(rows)
                for resource in replicated {
                    let replication = resource.replication!
                    var summary = "\(resource.name) here: \(replication.disk), \(replication.replication)"
                    if let lag = replication.lagBytes {
                        summary += ", \(formatBytes(lag))"
                        if let seconds = replication.lagSeconds { summary += " (\(String(format1: seconds)) s)" }
                        summary += " behind the primary \(replication.primary ?? "?")"
                    }
                    if let source = replication.fetchSource, source != replication.primary { summary += ", fetching from \(source)" }
                    if let offset = replication.syncOffset, let size = replication.syncSize, size > 0 {
                        summary += ", sync \(Int(Double(offset) * 100 / Double(size)))% (\(formatBytes(offset))/\(formatBytes(size)), \(formatBytes(replication.syncBytesSent ?? 0)) transferred)"
                    }
                    lines.append(summary)
                    if let problem = replication.problem { lines.append("\(resource.name): \(problem)") }
                }
            }
            for resource in status.resources {
                if let attached = resource.attached { lines.append("\(resource.name): local device \(attached)") }
                if let resize = resource.resize { lines.append("\(resource.name): resize \(resize)") }
                if let transition = resource.transition { lines.append("\(resource.name): \(transition)") }
                if let error = resource.error { lines.append("\(resource.name): \(error)") }
                if let failure = resource.log?.failure { lines.append("\(resource.name): \(failure)") }
                if let waiting = resource.log?.waitingWrites, waiting > 0 {
                    lines.append("\(resource.name): \(waiting) writes wait for room in memory or in the log area")
                }
            }
        }
        let header = ["EXPORT", "DEVICE", "SIZE", "MODE", "CONNS", "REQUESTS", "READ", "WRITTEN", "ERRORS"]
        var rows = [header]
        for export in status.exports {
            rows.append([
                export.name, export.device, formatBytes(export.size),
                (export.readOnly ? "ro," : "rw,") + export.cacheMode,
                "\(export.activeConnections)/\(export.totalConnections)", "\(export.requests)",
                formatBytes(UInt64(export.bytesRead)), formatBytes(UInt64(export.bytesWritten)), "\(export.errors)",
            ])
        }
        lines += table(rows)
        return lines.joined(separator: "\n")
    }

    static func table(_ rows: [[String]]) -> [String] {
        let widths = rows[0].indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        return rows.map { row in
            let cells = row.enumerated().map { index, cell in
                cell + String(repeating: " ", count: widths[index] - cell.count)
            }
            return cells.joined(separator: "  ").trimmingTrailingSpaces()
        }
    }

    public static func formatBytes(_ value: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
        var amount = Double(value)
        var unit = 0
        while amount >= 1024, unit < units.count - 1 {
            amount /= 1024
            unit += 1
        }
        if unit == 0 { return "\(value) B" }
        let rounded = (amount * 10).rounded() / 10
        return "\(rounded) \(units[unit])"
    }
}

extension String {
    /// One decimal place.
    fileprivate init(format1 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }

    fileprivate func trimmingTrailingSpaces() -> String {
        var result = self
        while result.last == " " { result.removeLast() }
        return result
    }
}
