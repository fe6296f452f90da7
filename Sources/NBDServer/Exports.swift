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

    init() {}
}

/// One export as the server holds it: what the handshake advertises, the device behind it, the
/// transaction log every change goes through (nil for a plain export), counters. A class: the data
/// path passes it with every request, and one reference costs one retain where a struct of them
/// cost one per field.
public final class ServedExport: Sendable {
    public let descriptor: ExportDescriptor
    public let device: BlockDevice
    public let log: LogEngine?
    public let statistics: ExportStatistics
    /// Set when the export is taken away; its connections close at their next request.
    let retired: Retired

    final class Retired: Sendable {
        let flag = Atomic<Bool>(false)
    }

    public var isRetired: Bool { retired.flag.load(ordering: .relaxed) }

    public init(name: String, description: String? = nil, device: BlockDevice, log: LogEngine? = nil) {
        self.descriptor = ExportDescriptor(
            name: name,
            description: description ?? "\(device.kind.rawValue) \(device.path)",
            size: device.size,
            readOnly: device.readOnly
        )
        self.device = device
        self.log = log
        self.statistics = ExportStatistics()
        self.retired = Retired()
    }
}

/// The exports of a server, by name. Exports come and go while the server runs (resources going
/// up and down); a connection sees the exports that existed when it connected.
public final class ExportTable: Sendable {
    private let table: Mutex<[ServedExport]>

    public init(_ exports: [ServedExport] = []) {
        self.table = Mutex(exports)
    }

    public var exports: [ServedExport] { table.withLock { $0 } }

    public var catalog: ExportCatalog { ExportCatalog(exports.map(\.descriptor)) }

    /// Adds an export; false when one of that name exists.
    @discardableResult
    public func add(_ export: ServedExport) -> Bool {
        table.withLock { exports in
            guard !exports.contains(where: { $0.descriptor.name == export.descriptor.name }) else { return false }
            exports.append(export)
            return true
        }
    }

    /// Removes an export; its open connections close at their next request.
    @discardableResult
    public func remove(named name: String) -> ServedExport? {
        table.withLock { exports in
            guard let index = exports.firstIndex(where: { $0.descriptor.name == name }) else { return nil }
            let export = exports.remove(at: index)
            export.retired.flag.store(true, ordering: .relaxed)
            return export
        }
    }

    func served(_ descriptor: ExportDescriptor) -> ServedExport? {
        table.withLock { exports in exports.first { $0.descriptor.name == descriptor.name } }
    }
}
