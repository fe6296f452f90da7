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

/// The exports a server offers, looked up by name during the handshake.
public struct ExportCatalog: Sendable {
    public private(set) var exports: [ExportDescriptor]

    public init(_ exports: [ExportDescriptor]) {
        self.exports = exports
    }

    /// The export a client means by `name`. The empty name is the default export, which exists when
    /// the server offers exactly one export.
    public func lookup(_ name: String) -> ExportDescriptor? {
        if name.isEmpty, exports.count == 1 { return exports[0] }
        return exports.first { $0.name == name }
    }
}
