import Crypto
import NIOCore

/// Who is at the other end, as it introduced itself (and proved, with the cluster secret).
public struct PeerIdentity: Sendable, Equatable {
    public var host: String
    public var hostID: String

    public init(host: String, hostID: String) {
        self.host = host
        self.hostID = hostID
    }
}

/// What the I/O glue must do with a message the handshake received.
public enum HandshakeAction: Sendable, Equatable {
    /// Send this and wait for the next message.
    case send(PeerMessage)
    /// Send this; the connection is then authenticated with this peer.
    case sendAndEstablish(PeerMessage, PeerIdentity)
    /// The connection is authenticated with this peer.
    case established(PeerIdentity)
    /// Send this `.refused` message, then close; `reason` is for the local log.
    case refuse(PeerMessage, reason: String)
    /// The other side refused us or broke the protocol: just close.
    case failed(reason: String)
}

/// The mutual authentication of a peer connection as a value: messages in, actions out, no I/O.
///
/// Both sides prove they know the cluster secret with an HMAC-SHA256 over both nonces and both
/// identities, so a proof is bound to this connection and cannot be replayed (`docs/peer-protocol.md`).
///
///     client                               server
///     hello(version, cluster, host, id, nonceC) →
///                  ← challenge(version, host, id, nonceS, proofS)
///     authenticate(proofC) →
///                  ← welcome
public struct PeerHandshake: Sendable {
    public enum Role: Sendable {
        case client, server
    }

    private enum State {
        case clientIdle
        case awaitingHello
        case awaitingChallenge
        /// The client has proved itself; `server` is who the server claimed (and proved) to be.
        case awaitingWelcome(server: PeerIdentity)
        case awaitingAuthenticate(client: PeerIdentity, expectedProof: [UInt8])
        case done
    }

    public let role: Role
    private let cluster: String
    private let secret: [UInt8]
    private let local: PeerIdentity
    private let nonce: [UInt8]
    private var peerNonce: [UInt8] = []
    private var state: State

    /// `nonce` must be 32 fresh random bytes: the I/O glue passes random ones, tests fixed ones.
    public init(role: Role, cluster: String, secret: [UInt8], local: PeerIdentity, nonce: [UInt8]) {
        precondition(nonce.count == PeerWire.nonceBytes, "a handshake nonce is \(PeerWire.nonceBytes) bytes, not \(nonce.count)")
        self.role = role
        self.cluster = cluster
        self.secret = secret
        self.local = local
        self.nonce = nonce
        self.state = role == .client ? .clientIdle : .awaitingHello
    }

    /// The client's hello; nil for the server, which waits for it.
    public mutating func start() -> PeerMessage? {
        guard role == .client, case .clientIdle = state else { return nil }
        state = .awaitingChallenge
        return .hello(
            PeerHello(version: PeerWire.version, cluster: cluster, host: local.host, hostID: local.hostID, nonce: nonce)
        )
    }

    public mutating func receive(_ message: PeerMessage) -> HandshakeAction {
        if case .done = state {
            return .failed(reason: "message '\(message.name)' after the handshake ended")
        }
        if case .refused(let reason) = message {
            state = .done
            return .failed(reason: "the peer refused: " + reason)
        }
        switch (state, message) {
        case (.awaitingHello, .hello(let hello)):
            return receiveHello(hello)
        case (.awaitingChallenge, .challenge(let challenge)):
            return receiveChallenge(challenge)
        case (.awaitingAuthenticate(let client, let expectedProof), .authenticate(let proof)):
            guard Self.constantTimeEqual(proof, expectedProof) else { return refuse("wrong cluster secret") }
            state = .done
            return .sendAndEstablish(.welcome, client)
        case (.awaitingWelcome(let server), .welcome):
            state = .done
            return .established(server)
        default:
            return refuse("unexpected message '\(message.name)' during the handshake")
        }
    }

    private mutating func receiveHello(_ hello: PeerHello) -> HandshakeAction {
        guard hello.version == PeerWire.version else {
            return refuse(versionMismatch(peer: hello.host, peerVersion: hello.version))
        }
        guard hello.cluster == cluster else { return refuse("wrong cluster \(hello.cluster)") }
        guard hello.nonce.count == PeerWire.nonceBytes else {
            return refuse("the nonce is \(hello.nonce.count) bytes, not \(PeerWire.nonceBytes)")
        }
        let client = PeerIdentity(host: hello.host, hostID: hello.hostID)
        let transcript = Transcript(
            cluster: cluster, client: client, server: local, clientNonce: hello.nonce, serverNonce: nonce
        )
        state = .awaitingAuthenticate(client: client, expectedProof: transcript.proof(label: .client, secret: secret))
        return .send(
            .challenge(
                PeerChallenge(
                    version: PeerWire.version, host: local.host, hostID: local.hostID, nonce: nonce,
                    proof: transcript.proof(label: .server, secret: secret)
                )
            )
        )
    }

    private mutating func receiveChallenge(_ challenge: PeerChallenge) -> HandshakeAction {
        guard challenge.version == PeerWire.version else {
            return refuse(versionMismatch(peer: challenge.host, peerVersion: challenge.version))
        }
        guard challenge.nonce.count == PeerWire.nonceBytes else {
            return refuse("the nonce is \(challenge.nonce.count) bytes, not \(PeerWire.nonceBytes)")
        }
        let server = PeerIdentity(host: challenge.host, hostID: challenge.hostID)
        let transcript = Transcript(
            cluster: cluster, client: local, server: server, clientNonce: nonce, serverNonce: challenge.nonce
        )
        guard Self.constantTimeEqual(challenge.proof, transcript.proof(label: .server, secret: secret)) else {
            return refuse("the peer could not prove it knows the cluster secret")
        }
        state = .awaitingWelcome(server: server)
        return .send(.authenticate(proof: transcript.proof(label: .client, secret: secret)))
    }

    /// Hosts of different versions never talk (no mixed cluster to reason about): the refusal,
    /// read on either side, names both versions and the host to upgrade.
    private func versionMismatch(peer: String, peerVersion: UInt16) -> String {
        let older = peerVersion < PeerWire.version ? peer : local.host
        return "\(local.host) speaks peer protocol version \(PeerWire.version), \(peer) version \(peerVersion): "
            + "all hosts of a cluster must run the same version; upgrade marsd on \(older)"
    }

    private mutating func refuse(_ reason: String) -> HandshakeAction {
        state = .done
        return .refuse(.refused(reason: reason), reason: reason)
    }

    /// Compares without an early exit, so the time taken does not reveal how much of a forged
    /// proof was right. (Lengths are public: proofs are always 32 bytes.)
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}

/// What both proofs cover. Everything either side said goes in, so a proof is valid for exactly
/// one pair of nonces and identities.
struct Transcript {
    enum Label: String {
        case server = "mars-peer-server"
        case client = "mars-peer-client"
    }

    var cluster: String
    var client: PeerIdentity
    var server: PeerIdentity
    var clientNonce: [UInt8]
    var serverNonce: [UInt8]

    /// HMAC-SHA256(secret, label ‖ nonceC ‖ nonceS ‖ lp(cluster) ‖ lp(client host) ‖ lp(client id)
    /// ‖ lp(server host) ‖ lp(server id)), lp = u16 LE length + UTF-8.
    func proof(label: Label, secret: [UInt8]) -> [UInt8] {
        var message = ByteBuffer(string: label.rawValue)
        message.writeBytes(clientNonce)
        message.writeBytes(serverNonce)
        for field in [cluster, client.host, client.hostID, server.host, server.hostID] {
            message.writeField(field)
        }
        let code = HMAC<SHA256>.authenticationCode(for: Array(message.readableBytesView), using: SymmetricKey(data: secret))
        return Array(code)
    }
}
