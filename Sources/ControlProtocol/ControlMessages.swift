import FoundationEssentials

/// The version marsd and marsadm report.
public let marsVersion = "0.1.0"

/// A request on marsd's control socket: one JSON object on one line.
public struct ControlRequest: Codable, Sendable, Equatable {
    public enum Command: String, Codable, Sendable {
        /// Status of the daemon and every export.
        case view
    }

    public var command: Command

    public init(command: Command) {
        self.command = command
    }
}

/// The reply: one JSON object on one line, then the daemon closes the connection.
public struct ControlResponse: Codable, Sendable, Equatable {
    public var error: String?
    public var status: DaemonStatus?

    public init(error: String? = nil, status: DaemonStatus? = nil) {
        self.error = error
        self.status = status
    }
}

public struct DaemonStatus: Codable, Sendable, Equatable {
    public var version: String
    public var pid: Int32
    public var ioEngine: String
    public var listeners: [String]
    public var exports: [ExportStatus]

    public init(version: String, pid: Int32, ioEngine: String, listeners: [String], exports: [ExportStatus]) {
        self.version = version
        self.pid = pid
        self.ioEngine = ioEngine
        self.listeners = listeners
        self.exports = exports
    }
}

public struct ExportStatus: Codable, Sendable, Equatable {
    public var name: String
    public var device: String
    public var kind: String
    public var size: UInt64
    public var readOnly: Bool
    public var cacheMode: String
    public var activeConnections: Int
    public var totalConnections: Int
    public var requests: Int
    public var bytesRead: Int
    public var bytesWritten: Int
    public var errors: Int

    public init(
        name: String, device: String, kind: String, size: UInt64, readOnly: Bool, cacheMode: String,
        activeConnections: Int, totalConnections: Int, requests: Int, bytesRead: Int, bytesWritten: Int, errors: Int
    ) {
        self.name = name
        self.device = device
        self.kind = kind
        self.size = size
        self.readOnly = readOnly
        self.cacheMode = cacheMode
        self.activeConnections = activeConnections
        self.totalConnections = totalConnections
        self.requests = requests
        self.bytesRead = bytesRead
        self.bytesWritten = bytesWritten
        self.errors = errors
    }
}

/// Encoding shared by both ends: compact JSON, one message per line.
public enum ControlCodec {
    public static let maxMessageSize = 1 << 20

    public static func encodeLine<T: Encodable>(_ value: T) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(value)) + [0x0A]
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: some Collection<UInt8>) throws -> T {
        try JSONDecoder().decode(type, from: Data(bytes))
    }

    public static func prettyJSON<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}
