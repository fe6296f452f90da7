import BlockStore
import LogEngine
import NBDProtocol
import Synchronization

/// Counters of one export, updated on the data path with relaxed atomics.
public final class ExportStatistics: Sendable {
    public let activeConnections = Atomic<Int>(0)
    public let totalConnections = Atomic<Int>(0)
    public let requests = Atomic<Int>(0)
    public let bytesRead = Atomic<Int>(0)
    public let bytesWritten = Atomic<Int>(0)
    public let errors = Atomic<Int>(0)
    /// READs answered with sendfile straight from the page cache (the rest are copied).
    public let pageCacheReads = Atomic<Int>(0)

    init() {}
}

/// One export as the server holds it: what the handshake advertises, the device behind it, the
/// transaction log every change goes through (nil for a plain export), counters. A class: the data
/// path passes it with every request, and one reference costs one retain where a struct of them
/// cost one per field.
public final class ServedExport: Sendable {
    public let device: BlockDevice
    public let log: LogEngine?
    public let statistics: ExportStatistics
    /// Set when the export is taken away; its connections close at their next request.
    let retired: Retired
    private let name: String
    private let summary: String
    private let readOnly: Bool
    /// What clients see; a resize changes it while the export is served.
    private let currentSize: Atomic<UInt64>

    final class Retired: Sendable {
        let flag = Atomic<Bool>(false)
    }

    public var isRetired: Bool { retired.flag.load(ordering: .relaxed) }

    /// What the handshake advertises: the size as it is now, so a client that connects after a
    /// resize learns the new size.
    public var descriptor: ExportDescriptor {
        ExportDescriptor(name: name, description: summary, size: size, readOnly: readOnly)
    }

    /// The export's size now. Requests are checked against it (not the size their connection
    /// negotiated), so a connection made before a resize may use the new end too: the kernel's
    /// NBD client of /dev/mars/NAME learns the new size without reconnecting.
    public var size: UInt64 { currentSize.load(ordering: .relaxed) }

    /// `size` is what clients see (default: the device's size). A resource passes its recorded size:
    /// a device that grew beyond it is not the resource's to hand out (see ResourceManager.bringUp).
    public init(name: String, description: String? = nil, device: BlockDevice, size: UInt64? = nil, log: LogEngine? = nil) {
        precondition(size.map { $0 <= device.size } ?? true, "an export cannot be larger than its device")
        self.name = name
        self.summary = description ?? "\(device.kind.rawValue) \(device.path)"
        self.readOnly = device.readOnly
        self.currentSize = Atomic(size ?? device.size)
        self.device = device
        self.log = log
        self.statistics = ExportStatistics()
        self.retired = Retired()
    }

    /// Serves `size` bytes from now on: new connections are told it, and every connection's
    /// requests are checked against it. The device must have that capacity already.
    public func resize(to size: UInt64) {
        precondition(size <= device.size, "an export cannot be larger than its device")
        currentSize.store(size, ordering: .relaxed)
    }
}

/// The exports of a server, by name. Exports come and go while the server runs (resources going
/// up and down); a connection sees the exports that existed when it connected. Names of resources
/// that are wanted up but still recovering are pending: a handshake naming one waits until the
/// export is added or given up (`notifyWhenDecided`). Names that are known but not served carry the
/// reason, which a client's error message repeats.
public final class ExportTable: Sendable {
    private struct Table {
        var exports: [ServedExport]
        var pending: Set<String> = []
        var unavailable: [String: String] = [:]
        var waiters: [UInt64: (name: String, notify: @Sendable () -> Void)] = [:]
        var nextWaiter: UInt64 = 0

        /// Takes the waiters for `name` out of the table.
        mutating func decided(_ name: String) -> [@Sendable () -> Void] {
            let matching = waiters.filter { $0.value.name == name }
            for key in matching.keys { waiters[key] = nil }
            return matching.values.map(\.notify)
        }
    }

    private let table: Mutex<Table>

    public init(_ exports: [ServedExport] = []) {
        self.table = Mutex(Table(exports: exports))
    }

    public var exports: [ServedExport] { table.withLock { $0.exports } }

    public var catalog: ExportCatalog {
        table.withLock { ExportCatalog($0.exports.map(\.descriptor), pending: $0.pending, unavailable: $0.unavailable) }
    }

    /// Whether `name` is pending (its resource is recovering).
    public func isPending(_ name: String) -> Bool { table.withLock { $0.pending.contains(name) } }

    /// Adds an export; false when one of that name exists. A pending entry of that name ends, and
    /// the handshakes that waited for it go on.
    @discardableResult
    public func add(_ export: ServedExport) -> Bool {
        let name = export.descriptor.name
        let (added, waiters) = table.withLock { table -> (Bool, [@Sendable () -> Void]) in
            guard !table.exports.contains(where: { $0.descriptor.name == name }) else { return (false, []) }
            table.exports.append(export)
            table.pending.remove(name)
            table.unavailable[name] = nil
            return (true, table.decided(name))
        }
        for notify in waiters { notify() }
        return added
    }

    /// Removes an export; its open connections close at their next request. `reason`, when given,
    /// is what later clients asking for the name are told.
    @discardableResult
    public func remove(named name: String, reason: String? = nil) -> ServedExport? {
        table.withLock { table in
            if let reason { table.unavailable[name] = reason }
            guard let index = table.exports.firstIndex(where: { $0.descriptor.name == name }) else { return nil }
            let export = table.exports.remove(at: index)
            export.retired.flag.store(true, ordering: .relaxed)
            return export
        }
    }

    /// Marks `name` as coming: handshakes naming it wait (see `ConnectionLimits.recoveryWait`).
    public func expect(_ name: String) {
        table.withLock { table in
            guard !table.exports.contains(where: { $0.descriptor.name == name }) else { return }
            table.pending.insert(name)
            table.unavailable[name] = nil
        }
    }

    /// Ends the pending entry of `name` without an export: waiting handshakes get `reason`.
    public func giveUp(_ name: String, reason: String) {
        let waiters = table.withLock { table -> [@Sendable () -> Void] in
            table.pending.remove(name)
            table.unavailable[name] = reason
            return table.decided(name)
        }
        for notify in waiters { notify() }
    }

    /// Says why `name`, which is not served, is not (a resource that is down or unusable).
    public func setUnavailable(_ name: String, reason: String) {
        table.withLock { $0.unavailable[name] = reason }
    }

    /// Calls `notify` once, from whichever thread decides it, when `name` stops being pending.
    /// Returns nil without registering when it is not pending now.
    public func notifyWhenDecided(_ name: String, _ notify: @escaping @Sendable () -> Void) -> UInt64? {
        table.withLock { table in
            guard table.pending.contains(name) else { return nil }
            table.nextWaiter += 1
            table.waiters[table.nextWaiter] = (name, notify)
            return table.nextWaiter
        }
    }

    public func cancelNotification(_ registration: UInt64) {
        _ = table.withLock { $0.waiters.removeValue(forKey: registration) }
    }

    func served(_ descriptor: ExportDescriptor) -> ServedExport? {
        table.withLock { table in table.exports.first { $0.descriptor.name == descriptor.name } }
    }
}
