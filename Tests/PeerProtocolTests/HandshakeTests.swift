import PeerProtocol
import Testing

@Suite("Peer handshake")
struct HandshakeTests {
    static let cluster = "0123abcd"
    static let secret = bytes(32, 0x40)
    static let alpha = PeerIdentity(host: "alpha", hostID: "id-alpha")
    static let beta = PeerIdentity(host: "beta", hostID: "id-beta")
    static let clientNonce = bytes(32, 0)
    static let serverNonce = bytes(32, 0x80)

    func makeClient(
        _ identity: PeerIdentity = alpha, cluster: String = cluster, secret: [UInt8] = secret, nonce: [UInt8] = clientNonce
    ) -> PeerHandshake {
        PeerHandshake(role: .client, cluster: cluster, secret: secret, local: identity, nonce: nonce)
    }

    func makeServer(
        _ identity: PeerIdentity = beta, cluster: String = cluster, secret: [UInt8] = secret, nonce: [UInt8] = serverNonce
    ) -> PeerHandshake {
        PeerHandshake(role: .server, cluster: cluster, secret: secret, local: identity, nonce: nonce)
    }

    /// Sends through a real frame, so the handshake and the codec agree.
    func wire(_ message: PeerMessage) throws -> PeerMessage {
        var decoder = PeerFrameDecoder()
        decoder.append(message.encodedFrame())
        let message = try decoder.next()
        return try #require(message)
    }

    func sent(_ action: HandshakeAction) -> PeerMessage? {
        if case .send(let message) = action { return message }
        return nil
    }

    /// The client's hello.
    func start(_ handshake: inout PeerHandshake) throws -> PeerMessage {
        let hello = handshake.start()
        return try #require(hello)
    }

    /// What `handshake` sends in answer to `message`, which must be a plain `.send`.
    func answer(_ handshake: inout PeerHandshake, _ message: PeerMessage) throws -> PeerMessage {
        let action = handshake.receive(message)
        let reply = sent(action)
        return try #require(reply, "expected a message to send, got \(action)")
    }

    func hex(_ bytes: [UInt8]) -> String {
        bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    }

    @Test(arguments: [(alpha, beta), (beta, alpha)])
    func happyPath(clientIdentity: PeerIdentity, serverIdentity: PeerIdentity) throws {
        var client = makeClient(clientIdentity)
        var server = makeServer(serverIdentity)
        #expect(server.start() == nil)
        let hello = try start(&client)
        #expect(client.start() == nil)
        #expect(hello == .hello(PeerHello(version: 2, cluster: Self.cluster, host: clientIdentity.host, hostID: clientIdentity.hostID, nonce: Self.clientNonce)))
        let challenge = try answer(&server, try wire(hello))
        guard case .challenge(let c) = challenge else { Issue.record("expected a challenge, got \(challenge)"); return }
        #expect(c.host == serverIdentity.host && c.hostID == serverIdentity.hostID && c.nonce == Self.serverNonce && c.version == 2)
        let authenticate = try answer(&client, try wire(challenge))
        #expect(server.receive(try wire(authenticate)) == .sendAndEstablish(.welcome, clientIdentity))
        #expect(client.receive(try wire(.welcome)) == .established(serverIdentity))
        // Done: nothing more belongs to the handshake.
        guard case .failed = client.receive(.ping(1)), case .failed = server.receive(.welcome) else {
            Issue.record("messages after the handshake must fail it")
            return
        }
    }

    /// The proofs over the documented inputs (checked with Python's hmac module).
    @Test func knownProofs() throws {
        var client = makeClient()
        var server = makeServer()
        let challenge = try answer(&server, try start(&client))
        guard case .challenge(let c) = challenge else { Issue.record("no challenge"); return }
        #expect(hex(c.proof) == "f2d548b844ce0185c2a6cfb740006512606a46ede6dd0c7b32f4e9b7534eb2d9")
        let authenticate = sent(client.receive(challenge))
        guard case .authenticate(let proof) = authenticate else { Issue.record("no authenticate"); return }
        #expect(hex(proof) == "a41d6d8797d0beb7608d2cca7e75cebf345160acebc0786043e5ab6d21fe9ff7")
    }

    @Test func clientRefusesAServerWithTheWrongSecret() throws {
        var client = makeClient()
        var server = makeServer(secret: bytes(32, 0x41))
        let challenge = try answer(&server, try start(&client))
        let reason = "the peer could not prove it knows the cluster secret"
        #expect(client.receive(challenge) == .refuse(.refused(reason: reason), reason: reason))
        #expect(server.receive(.refused(reason: reason)) == .failed(reason: "the peer refused: " + reason))
    }

    @Test func serverRefusesAClientWithTheWrongSecret() throws {
        // A client and an impostor server sharing the wrong secret produce a well-formed
        // authenticate for the real server's nonce and identity.
        var impostor = makeClient(secret: bytes(32, 0x41))
        var impostorsServer = makeServer(secret: bytes(32, 0x41))
        let hello = try start(&impostor)
        let authenticate = try answer(&impostor, try answer(&impostorsServer, hello))
        var server = makeServer()
        #expect(sent(server.receive(hello)) != nil)
        let reason = "wrong cluster secret"
        #expect(server.receive(authenticate) == .refuse(.refused(reason: reason), reason: reason))
        #expect(impostor.receive(.refused(reason: reason)) == .failed(reason: "the peer refused: wrong cluster secret"))
    }

    @Test func forgedProof() {
        var server = makeServer()
        _ = server.receive(.hello(PeerHello(version: 2, cluster: Self.cluster, host: "x", hostID: "y", nonce: Self.clientNonce)))
        guard case .refuse(_, "wrong cluster secret") = server.receive(.authenticate(proof: bytes(32, 9))) else {
            Issue.record("a forged proof was accepted")
            return
        }
    }

    @Test func wrongCluster() throws {
        var client = makeClient(cluster: "feedbeef")
        var server = makeServer()
        let reason = "wrong cluster feedbeef"
        #expect(server.receive(try start(&client)) == .refuse(.refused(reason: reason), reason: reason))
    }

    /// Every host of a cluster runs the same protocol version: a v1 host (before `fetch` carried
    /// an epoch) is refused in the handshake, and the refusal names both versions and the host to
    /// upgrade, whichever side reads it.
    @Test func aVersion1PeerIsRefused() throws {
        var server = makeServer()
        let hello = PeerHello(version: 1, cluster: Self.cluster, host: "alpha", hostID: "id-alpha", nonce: Self.clientNonce)
        let reason = "beta speaks peer protocol version 2, alpha version 1: all hosts of a cluster must run the same version; upgrade marsd on alpha"
        #expect(server.receive(.hello(hello)) == .refuse(.refused(reason: reason), reason: reason))

        var client = makeClient()
        var honest = makeServer()
        guard case .challenge(var challenge) = sent(honest.receive(try start(&client))) else {
            Issue.record("no challenge")
            return
        }
        challenge.version = 1
        guard case .refuse(.refused(let sentReason), let clientReason) = client.receive(.challenge(challenge)) else {
            Issue.record("a version 1 challenge was accepted")
            return
        }
        #expect(clientReason == "alpha speaks peer protocol version 2, beta version 1: all hosts of a cluster must run the same version; upgrade marsd on beta")
        #expect(sentReason == clientReason)
    }

    /// A newer peer is refused too; then this host is the one to upgrade.
    @Test func aNewerPeerIsRefused() throws {
        var server = makeServer()
        let hello = PeerHello(version: 3, cluster: Self.cluster, host: "alpha", hostID: "id-alpha", nonce: Self.clientNonce)
        let reason = "beta speaks peer protocol version 2, alpha version 3: all hosts of a cluster must run the same version; upgrade marsd on beta"
        #expect(server.receive(.hello(hello)) == .refuse(.refused(reason: reason), reason: reason))
    }

    @Test func shortNonceInAConstructedHello() {
        var server = makeServer()
        let hello = PeerHello(version: 2, cluster: Self.cluster, host: "alpha", hostID: "id-alpha", nonce: bytes(8, 0))
        guard case .refuse = server.receive(.hello(hello)) else {
            Issue.record("an 8-byte nonce was accepted")
            return
        }
    }

    @Test func outOfOrderMessages() throws {
        func expectUnexpected(_ action: HandshakeAction, _ name: String) {
            let reason = "unexpected message '\(name)' during the handshake"
            #expect(action == .refuse(.refused(reason: reason), reason: reason))
        }
        var s1 = makeServer()
        expectUnexpected(s1.receive(.authenticate(proof: bytes(32, 0))), "authenticate")
        var s2 = makeServer()
        expectUnexpected(s2.receive(.ping(1)), "ping")
        var s3 = makeServer()
        var helloClient = makeClient()
        let hello = try start(&helloClient)
        _ = s3.receive(hello)
        expectUnexpected(s3.receive(hello), "hello")
        var s4 = makeServer()
        expectUnexpected(s4.receive(.welcome), "welcome")

        var c1 = makeClient()
        expectUnexpected(c1.receive(.welcome), "welcome")  // before start
        var c2 = makeClient()
        _ = c2.start()
        expectUnexpected(c2.receive(.welcome), "welcome")  // before the challenge
        var c3 = makeClient()
        var s5 = makeServer()
        let challenge = try answer(&s5, try start(&c3))
        _ = c3.receive(challenge)
        expectUnexpected(c3.receive(challenge), "challenge")  // twice
        var c4 = makeClient()
        _ = c4.start()
        expectUnexpected(c4.receive(.gossip(entries: [])), "gossip")
    }

    @Test func refusalIsForwardedAsFailure() {
        var client = makeClient()
        _ = client.start()
        #expect(client.receive(.refused(reason: "wrong cluster x")) == .failed(reason: "the peer refused: wrong cluster x"))
        guard case .failed = client.receive(.welcome) else {
            Issue.record("a failed handshake went on")
            return
        }
        var server = makeServer()
        #expect(server.receive(.refused(reason: "busy")) == .failed(reason: "the peer refused: busy"))
    }

    @Test func afterRefusingEverythingFails() {
        var server = makeServer()
        _ = server.receive(.ping(1))
        guard case .failed = server.receive(.hello(PeerHello(version: 2, cluster: Self.cluster, host: "a", hostID: "b", nonce: Self.clientNonce))) else {
            Issue.record("a refused handshake went on")
            return
        }
    }

    /// An eavesdropper's recording of a good session does not authenticate a new one.
    @Test func replayedAuthenticateFails() throws {
        var client = makeClient()
        var server = makeServer()
        let hello = try start(&client)
        let challenge = try answer(&server, hello)
        let authenticate = try answer(&client, challenge)
        #expect(server.receive(authenticate) == .sendAndEstablish(.welcome, Self.alpha))

        // Same hello and authenticate, but the server picks a new nonce.
        var next = makeServer(nonce: bytes(32, 0x90))
        #expect(sent(next.receive(hello)) != nil)
        guard case .refuse(_, "wrong cluster secret") = next.receive(authenticate) else {
            Issue.record("a replayed authenticate was accepted")
            return
        }
        // And a recorded challenge does not fool a client with a new nonce.
        var nextClient = makeClient(nonce: bytes(32, 0x10))
        _ = nextClient.start()
        guard case .refuse(_, "the peer could not prove it knows the cluster secret") = nextClient.receive(challenge) else {
            Issue.record("a replayed challenge was accepted")
            return
        }
    }

    /// The proof covers the identities: a relay cannot swap the server's claimed name.
    @Test func tamperedIdentityFails() throws {
        var client = makeClient()
        var server = makeServer()
        guard case .challenge(var challenge) = sent(server.receive(try start(&client))) else {
            Issue.record("no challenge")
            return
        }
        challenge.host = "gamma"
        guard case .refuse = client.receive(.challenge(challenge)) else {
            Issue.record("a challenge with a swapped host name was accepted")
            return
        }
    }
}
