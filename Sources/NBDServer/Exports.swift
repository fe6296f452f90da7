import BlockStore
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

/// One export as the server holds it: what the handshake advertises, the device behind it, counters.
public struct ServedExport: Sendable {
    public let descriptor: ExportDescriptor
    public let device: BlockDevice
    public let statistics: ExportStatistics

    public init(name: String, description: String? = nil, device: BlockDevice) {
        self.descriptor = ExportDescriptor(
            name: name,
            description: description ?? "\(device.kind.rawValue) \(device.path)",
            size: device.size,
            readOnly: device.readOnly
        )
        self.device = device
        self.statistics = ExportStatistics()
    }
}

/// The exports of a server, by name.
public struct ExportTable: Sendable {
    public let exports: [ServedExport]
    public let catalog: ExportCatalog

    public init(_ exports: [ServedExport]) {
        self.exports = exports
        self.catalog = ExportCatalog(exports.map(\.descriptor))
    }

    func served(_ descriptor: ExportDescriptor) -> ServedExport? {
        exports.first { $0.descriptor.name == descriptor.name }
    }
}
