#if canImport(Glibc)
import Glibc
#endif

/// Seeds of randomized tests. Every randomized test takes its seed from here and prints it, so a
/// failure can be replayed: `MARS_TEST_SEED=N swift test --filter NAME` runs exactly that seed.
public enum TestSeed {
    /// MARS_TEST_SEED, when set (decimal or 0x hex).
    public static var fromEnvironment: UInt64? {
        guard let raw = getenv("MARS_TEST_SEED") else { return nil }
        let text = String(cString: raw)
        if text.hasPrefix("0x") { return UInt64(text.dropFirst(2), radix: 16) }
        return UInt64(text)
    }

    /// How often a test whose outcome also depends on thread timing runs a seed given in the
    /// environment (MARS_TEST_REPEAT, default 1): the seed fixes the workload and the failure
    /// injected, the repeats give the interleaving that failed another chance to happen.
    public static var repeats: Int {
        guard let raw = getenv("MARS_TEST_REPEAT"), let count = Int(String(cString: raw)), count > 0 else { return 1 }
        return count
    }

    /// The seed for `test`: the environment's, else a random one; printed either way.
    public static func make(_ test: String) -> UInt64 {
        let seed = fromEnvironment ?? UInt64.random(in: 0...UInt64.max)
        announce(test, seed)
        return seed
    }

    /// The seeds a parameterized test runs: the environment's alone when set, else `defaults`.
    public static func list(_ defaults: some Sequence<UInt64>) -> [UInt64] {
        fromEnvironment.map { [$0] } ?? Array(defaults)
    }

    public static func announce(_ test: String, _ seed: UInt64) {
        print("seed \(seed) for \(test) (replay: MARS_TEST_SEED=\(seed) swift test --filter \(test))")
    }
}
