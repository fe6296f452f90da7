/// The human-readable form of `marsadm view`.
public enum StatusTable {
    public static func render(_ status: DaemonStatus) -> String {
        var lines = [
            "marsd \(status.version) pid \(status.pid), I/O engine \(status.ioEngine)",
            "listening on \(status.listeners.joined(separator: ", "))",
        ]
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
        let widths = header.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
        for row in rows {
            let cells = row.enumerated().map { index, cell in
                cell + String(repeating: " ", count: widths[index] - cell.count)
            }
            lines.append(cells.joined(separator: "  ").trimmingTrailingSpaces())
        }
        return lines.joined(separator: "\n")
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
    fileprivate func trimmingTrailingSpaces() -> String {
        var result = self
        while result.last == " " { result.removeLast() }
        return result
    }
}
