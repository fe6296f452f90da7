import BlockStore

#if canImport(Glibc)
import Glibc
#endif

extension LogEngine {
    // MARK: - Spare preparer thread

    /// A segment's size rounded up to whole direct-I/O blocks: the size of a prepared spare.
    var preparedSpareSize: UInt64 { StorageAlignment.roundUp(configuration.segmentSize) }

    /// Whether the log writer would profit from a prepared spare now: none is ready or being made,
    /// the open segment holds an eighth of a segment or 4 MiB of records (so a resource that has
    /// hardly written keeps no spare), the log is not sealed (it takes no more records), and the
    /// spare fits in the log space with a segment and a record to spare (it never makes a write wait).
    func needsPreparedSpare(_ state: State) -> Bool {
        guard state.spares.isEmpty, state.preparingBytes == 0, !state.stopping, state.sealing == nil, let open = state.segments.last
        else { return false }
        return state.durableLSN - open.firstLSN >= min(configuration.segmentSize / 8, 4 << 20)
            && state.logBytes + preparedSpareSize + configuration.segmentSize + configuration.maxRecordSize <= configuration.spaceLimit
    }

    /// Keeps a spare ready whose every block is written (zeroes), made while the log writer fills
    /// the open segment. Appending over written blocks needs no metadata change, so each group
    /// commit's fdatasync is a data flush and never waits for a filesystem journal commit, which
    /// waits in turn for the data device's own writeback (measured 10-20 ms under load,
    /// BENCHMARKS.md). Retired segments become spares too; this covers a log that grows faster. The
    /// log writer leaves a new (unwritten) segment for a spare as soon as one is ready.
    func sparePreparerLoop() {
        var number = 0
        while true {
            let size = monitor.wait(
                prepareWake, until: { state in state.stopping || needsPreparedSpare(state) },
                then: { state -> UInt64? in
                    guard !state.stopping else { return nil }
                    state.preparingBytes = preparedSpareSize
                    return preparedSpareSize
                }
            )
            guard let size else { return }
            number += 1
            let name = Self.sparePrefix + "prepared-\(number)"
            do {
                let ready = try prepareSpare(name, size: size)
                monitor.withLock { state in
                    state.preparingBytes = 0
                    if ready { state.spares.append(Spare(fileName: name, size: size)) }
                }
                if !ready { try? directory.remove(name) }
            } catch {
                try? directory.remove(name)
                // No retry loop against a full or failing filesystem: the log works without spares.
                // The next attempt comes after a pause, when the writer still needs one.
                monitor.withLock { state in state.preparingBytes = 0 }
                monitor.wait(prepareWake, timeout: .seconds(30), until: { $0.stopping }, then: { _ in })
            }
        }
    }

    /// Writes `size` bytes of zeroes to a new file `name` with direct I/O and makes it durable.
    /// Returns false when the engine began to stop meanwhile (the file is then incomplete).
    private func prepareSpare(_ name: String, size: UInt64) throws(SystemError) -> Bool {
        let file = try directory.open(name, create: true, direct: true)
        try file.truncate(to: 0)
        try file.preallocate(size)
        guard try file.writeZeroes(offset: 0, length: size, while: { !monitor.withLock { $0.stopping } }) else { return false }
        try file.sync()
        try directory.sync()
        return true
    }
}
