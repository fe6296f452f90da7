/// A failure marsd reports to the operator before exiting: what went wrong and what to do.
public struct DaemonError: Error, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}
