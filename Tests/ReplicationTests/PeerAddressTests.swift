import Replication
import Testing

@Suite struct PeerAddressTests {
    @Test(arguments: [
        ("127.0.0.2:7777", "127.0.0.2", 7777), ("127.0.0.2", "127.0.0.2", 7777), ("[::1]:7000", "::1", 7000), ("[::1]", "::1", 7777),
        ("host.example:1", "host.example", 1),
    ])
    func parses(text: String, host: String, port: Int) throws {
        let address = try PeerAddress(parsing: text)
        #expect(address.host == host)
        #expect(address.port == port)
    }

    @Test(arguments: ["", ":7777", "a:0", "a:65536", "a:x", "[::1", "[::1]x"])
    func refuses(text: String) {
        #expect(throws: ReplicationError.self) { try PeerAddress(parsing: text) }
    }
}
