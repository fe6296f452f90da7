/// What the handshake needs to know about one export: its name, size and capabilities.
public struct ExportDescriptor: Sendable, Hashable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var readOnly: Bool

    public init(name: String, description: String, size: UInt64, readOnly: Bool) {
        self.name = name
        self.description = description
        self.size = size
        self.readOnly = readOnly
    }

    /// The transmission flags advertised for this export. DF is only advertised when structured
    /// replies were negotiated, as the spec requires.
    public func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .canMultiConn, .sendCache]
        if readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// The exports a server offers, looked up by name during the handshake, and the names it knows but
/// does not serve yet (a resource still recovering: a handshake naming it waits) or at all (a
/// resource that is down or failed: the reason goes into the error the client gets).
public struct ExportCatalog: Sendable {
    public private(set) var exports: [ExportDescriptor]
    /// Names that will be served once their recovery ends.
    public private(set) var pending: Set<String>
    /// Why a known name is not served, by name.
    public private(set) var unavailable: [String: String]

    public init(_ exports: [ExportDescriptor], pending: Set<String> = [], unavailable: [String: String] = [:]) {
        self.exports = exports
        self.pending = pending
        self.unavailable = unavailable
    }

    /// The export a client means by `name`. The empty name is the default export, which exists when
    /// the server offers exactly one export (and none is pending).
    public func lookup(_ name: String) -> ExportDescriptor? {
        if name.isEmpty, exports.count == 1, pending.isEmpty { return exports[0] }
        return exports.first { $0.name == name }
    }

    /// The pending name a client means by `name`, or nil when `name` is served or unknown.
    public func pendingName(_ name: String) -> String? {
        if name.isEmpty, exports.isEmpty, pending.count == 1 { return pending.first }
        return pending.contains(name) && lookup(name) == nil ? name : nil
    }

    /// The error text for a name that is not served: the reason, when the name is known.
    public func missingMessage(_ name: String) -> String {
        if let reason = unavailable[name] { return "no export named '\(name)': \(reason)" }
        return "no export named '\(name)'"
    }
}
