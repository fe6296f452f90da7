import PeerProtocol
import TestSupport
import Testing

@Suite("Join tokens")
struct JoinTokenTests {
    static let shape = "a join token looks like mars1-<cluster>-<64 hex digits>"
    static let secretHex = "000102030405060708090a0b0c0d0e0f" + "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf"

    @Test func textFormat() throws {
        let token = JoinToken(cluster: "00ff", secret: (0..<16).map { UInt8($0) } + (0..<16).map { UInt8(0xA0 + $0) })
        #expect(token.text == "mars1-00ff-000102030405060708090a0b0c0d0e0fa0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
        let parsed = try JoinToken(parsing: "mars1-0123abcd-" + Self.secretHex)
        #expect(parsed.cluster == "0123abcd")
        #expect(parsed.secret.count == 32 && parsed.secret[16] == 0xA0 && parsed.secret[31] == 0xAF)
        #expect(parsed.text == "mars1-0123abcd-" + Self.secretHex)
    }

    @Test func generatedTokensRoundTrip() throws {
        var g = seededGenerator()
        for _ in 0..<200 {
            let cluster = String((0..<Int.random(in: 1...64, using: &g)).map { _ in "0123456789abcdef".randomElement(using: &g)! })
            let token = JoinToken.generate(cluster: cluster, using: &g)
            #expect(token.secret.count == 32)
            #expect(try JoinToken(parsing: token.text) == token)
        }
        var a = SplitMix64(state: 1)
        var b = SplitMix64(state: 2)
        #expect(JoinToken.generate(cluster: "ab", using: &a) != JoinToken.generate(cluster: "ab", using: &b))
    }

    @Test func uppercaseAndWhitespaceAccepted() throws {
        let token = try JoinToken(parsing: "  MARS1-0123ABCD-\(Self.secretHex.uppercased())\n")
        #expect(token == (try JoinToken(parsing: "mars1-0123abcd-" + Self.secretHex)))
    }

    static let malformedTokens: [(String, String)] = [
        ("", "this one has no 'mars1-' prefix"),
        ("0123abcd-" + secretHex, "this one has no 'mars1-' prefix"),
        ("mars2-0123abcd-" + secretHex, "this one has no 'mars1-' prefix"),
        ("mars1-0123abcd" + secretHex, "this one has no '-' between the cluster and the secret"),
        ("mars1-", "this one has no '-' between the cluster and the secret"),
        ("mars1--" + secretHex, "this one's cluster is empty"),
        ("mars1-" + String(repeating: "a", count: 65) + "-" + secretHex, "this one's cluster has 65 characters, more than 64"),
        ("mars1-01x3-" + secretHex, "this one's cluster '01x3' has characters other than 0-9 and a-f"),
        ("mars1-ab-cd-" + secretHex, "this one's cluster 'ab-cd' has characters other than 0-9 and a-f"),
        ("mars1-0123abcd-", "this one's secret has 0 characters, not 64"),
        ("mars1-0123abcd-" + secretHex.dropLast(), "this one's secret has 63 characters, not 64"),
        ("mars1-0123abcd-" + secretHex + "0", "this one's secret has 65 characters, not 64"),
        ("mars1-0123abcd-" + secretHex.dropLast() + "g", "this one's secret has characters other than hex digits"),
        ("mars1-0123abcd-" + secretHex.dropLast() + "é", "this one's secret has characters other than hex digits"),
        ("mars1-0123abcd-" + secretHex.dropLast(2) + "é", "this one's secret has 63 characters, not 64"),
    ]

    @Test(arguments: malformedTokens)
    func malformed(_ text: String, _ problem: String) {
        do {
            let token = try JoinToken(parsing: text)
            Issue.record("'\(text)' parsed as \(token)")
        } catch {
            #expect(error.reason.hasPrefix(Self.shape + "; "))
            #expect(error.reason.contains(problem), "\(error.reason)")
        }
    }
}
