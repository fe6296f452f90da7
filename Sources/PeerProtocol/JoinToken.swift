/// What a new host needs to join a cluster: its id and the shared secret, as one line an operator
/// copies from `marsadm` on a member to the new host: `mars1-<cluster>-<64 hex digits>`.
public struct JoinToken: Sendable, Equatable {
    public static let secretBytes = 32
    public static let maxClusterLength = 64
    private static let prefix = "mars1-"
    private static let shape = "a join token looks like mars1-<cluster>-<64 hex digits>"

    public var cluster: String
    public var secret: [UInt8]

    public init(cluster: String, secret: [UInt8]) {
        self.cluster = cluster
        self.secret = secret
    }

    public static func generate<G: RandomNumberGenerator>(cluster: String, using generator: inout G) -> JoinToken {
        JoinToken(cluster: cluster, secret: (0..<secretBytes).map { _ in UInt8.random(in: .min ... .max, using: &generator) })
    }

    public var text: String {
        Self.prefix + cluster + "-" + secret.map { byte in
            let digits = Array("0123456789abcdef")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0xF)]])
        }.joined()
    }

    /// Accepts upper- or lowercase and surrounding whitespace (tokens get pasted around); the
    /// result is lowercase, as cluster ids are.
    public init(parsing input: String) throws(PeerProtocolError) {
        let text = input.trimmingWhitespace().lowercased()
        guard text.hasPrefix(Self.prefix) else {
            throw PeerProtocolError("\(Self.shape); this one has no '\(Self.prefix)' prefix")
        }
        let rest = text.dropFirst(Self.prefix.count)
        guard let dash = rest.lastIndex(of: "-") else {
            throw PeerProtocolError("\(Self.shape); this one has no '-' between the cluster and the secret")
        }
        let cluster = String(rest[..<dash])
        let secretDigits = rest[rest.index(after: dash)...]
        guard !cluster.isEmpty else { throw PeerProtocolError("\(Self.shape); this one's cluster is empty") }
        guard cluster.count <= Self.maxClusterLength else {
            throw PeerProtocolError(
                "\(Self.shape); this one's cluster has \(cluster.count) characters, more than \(Self.maxClusterLength)"
            )
        }
        guard cluster.utf8.allSatisfy({ Self.hexValue($0) != nil }) else {
            throw PeerProtocolError("\(Self.shape); this one's cluster '\(cluster)' has characters other than 0-9 and a-f")
        }
        guard secretDigits.count == 2 * Self.secretBytes else {
            throw PeerProtocolError(
                "\(Self.shape); this one's secret has \(secretDigits.count) characters, not \(2 * Self.secretBytes)"
            )
        }
        let secretText = Array(secretDigits.utf8)
        guard secretText.allSatisfy({ Self.hexValue($0) != nil }) else {
            throw PeerProtocolError("\(Self.shape); this one's secret has characters other than hex digits")
        }
        // All ASCII now, so 64 characters are 64 bytes.
        let secret = stride(from: 0, to: secretText.count, by: 2).map { pair in
            Self.hexValue(secretText[pair])! << 4 | Self.hexValue(secretText[pair + 1])!
        }
        self.init(cluster: cluster, secret: secret)
    }

    private static func hexValue(_ char: UInt8) -> UInt8? {
        switch char {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): char - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): char - UInt8(ascii: "a") + 10
        default: nil
        }
    }
}

extension String {
    fileprivate func trimmingWhitespace() -> String {
        let characters = drop(while: \.isWhitespace)
        return String(characters.reversed().drop(while: \.isWhitespace).reversed())
    }
}
