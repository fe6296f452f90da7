import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An in-memory disk for power-loss tests: files and directories whose writes are volatile until
/// synced, like a real disk's cache. `powerLoss` throws away what was not synced (or, to model a
/// disk that persisted some of it in order, keeps a random prefix of it, the last write possibly
/// torn), and every handle opened before it fails from then on.
public final class SimulatedDisk: Sendable {
    public enum PowerLossMode: Sendable {
        /// Every write, truncation and name change not covered by a sync is lost.
        case dropUnsynced
        /// Per file, a prefix of the unsynced changes survives, cut at a random byte; the
        /// directory keeps a prefix of its unsynced name changes.
        case keepRandomPrefix(seed: UInt64)
        /// A disk cache that persists in any order: each 512-byte sector of each unsynced write, and
        /// each unsynced truncation, survives or not at random (applied in order); the directory
        /// keeps a prefix of its unsynced name changes.
        case keepRandomSectors(seed: UInt64)
    }

    fileprivate enum Change {
        case write(offset: Int, bytes: [UInt8])
        case truncate(size: Int)
    }

    fileprivate struct Node {
        var durable: [UInt8] = []
        var current: [UInt8] = []
        var unsynced: [Change] = []
    }

    fileprivate enum NameChange {
        case link(String, Int)
        case unlink(String)
    }

    fileprivate struct State {
        var nodes: [Int: Node] = [:]
        var names: [String: Int] = [:]
        var durableNames: [String: Int] = [:]
        var unsyncedNames: [NameChange] = []
        var nextNode = 0
        /// Bumped by every power loss; handles from an older generation are dead.
        var generation = 0
    }

    private let state = Mutex(State())

    public init() {}

    /// A directory of this disk (names are kept per path).
    public func directory(_ path: String) -> any StorageDirectory {
        SimulatedDirectory(disk: self, path: path)
    }

    /// The bytes of `path/name` a power loss now would certainly leave (its synced content, if its
    /// name is synced), or nil.
    public func durableContent(_ path: String, _ name: String) -> [UInt8]? {
        state.withLock { state in state.durableNames[path + "/" + name].map { state.nodes[$0]!.durable } }
    }

    /// The names in `path` a power loss now would certainly leave.
    public func durableNames(in path: String) -> [String] {
        state.withLock { state in
            state.durableNames.keys.filter { $0.hasPrefix(path + "/") }.map { String($0.dropFirst(path.count + 1)) }.sorted()
        }
    }

    /// Cuts the power: unsynced changes are lost as `mode` says; open handles die.
    public func powerLoss(_ mode: PowerLossMode = .dropUnsynced) {
        state.withLock { state in
            let seed: UInt64? = switch mode {
            case .dropUnsynced: nil
            case .keepRandomPrefix(let seed), .keepRandomSectors(let seed): seed
            }
            var random = SplitMix(seed: seed ?? 0)
            let keepSome = seed != nil
            var names = state.durableNames
            if keepSome {
                let kept = Int(random.next() % UInt64(state.unsyncedNames.count + 1))
                for change in state.unsyncedNames.prefix(kept) {
                    switch change {
                    case .link(let name, let node): names[name] = node
                    case .unlink(let name): names[name] = nil
                    }
                }
            }
            for (id, var node) in state.nodes {
                var content = node.durable
                if case .keepRandomSectors = mode {
                    for change in node.unsynced where random.next() % 4 != 0 {
                        switch change {
                        case .truncate:
                            Self.apply(change, to: &content)
                        case .write(let offset, let bytes):
                            var sector = offset / 512 * 512
                            while sector < offset + bytes.count {
                                let from = max(sector, offset)
                                let to = min(sector + 512, offset + bytes.count)
                                if random.next() % 2 == 0 {
                                    Self.apply(.write(offset: from, bytes: Array(bytes[(from - offset)..<(to - offset)])), to: &content)
                                }
                                sector += 512
                            }
                        }
                    }
                } else if keepSome, !node.unsynced.isEmpty {
                    let kept = Int(random.next() % UInt64(node.unsynced.count + 1))
                    for (index, change) in node.unsynced.prefix(kept).enumerated() {
                        var change = change
                        if index == kept - 1, case .write(let offset, let bytes) = change, !bytes.isEmpty {
                            change = .write(offset: offset, bytes: Array(bytes.prefix(Int(random.next() % UInt64(bytes.count + 1)))))
                        }
                        Self.apply(change, to: &content)
                    }
                }
                node.durable = content
                node.current = content
                node.unsynced = []
                state.nodes[id] = node
            }
            state.names = names
            state.durableNames = names
            state.unsyncedNames = []
            state.generation += 1
        }
    }

    fileprivate static func apply(_ change: Change, to content: inout [UInt8]) {
        switch change {
        case .write(let offset, let bytes):
            if content.count < offset + bytes.count { content += [UInt8](repeating: 0, count: offset + bytes.count - content.count) }
            content.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
        case .truncate(let size):
            if size < content.count { content.removeLast(content.count - size) } else {
                content += [UInt8](repeating: 0, count: size - content.count)
            }
        }
    }

    fileprivate func withLiveState<T>(_ generation: Int, _ what: String, _ body: (inout State) throws(SystemError) -> T) throws(SystemError) -> T {
        try state.withLock { (state) throws(SystemError) -> T in
            guard state.generation == generation else { throw SystemError("access", "\(what) (power lost)", errno: EIO) }
            return try body(&state)
        }
    }

    fileprivate var generation: Int { state.withLock { $0.generation } }
}

/// A deterministic generator for the power-loss choices.
private struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

private struct SimulatedDirectory: StorageDirectory {
    let disk: SimulatedDisk
    let path: String

    private func key(_ name: String) -> String { path + "/" + name }

    func list() throws(SystemError) -> [String] {
        let prefix = path + "/"
        return try disk.withLiveState(disk.generation, path) { state in
            state.names.keys.filter { $0.hasPrefix(prefix) }.map { String($0.dropFirst(prefix.count)) }.sorted()
        }
    }

    func open(_ name: String, create: Bool, direct: Bool) throws(SystemError) -> any StorageFile {
        let generation = disk.generation
        let key = key(name)
        let node = try disk.withLiveState(generation, key) { (state) throws(SystemError) -> Int in
            if let node = state.names[key] { return node }
            guard create else { throw SystemError("open", key, errno: ENOENT) }
            let node = state.nextNode
            state.nextNode += 1
            state.nodes[node] = SimulatedDisk.Node()
            state.names[key] = node
            state.unsyncedNames.append(.link(key, node))
            return node
        }
        return SimulatedFile(disk: disk, node: node, name: key, generation: generation, direct: direct)
    }

    func remove(_ name: String) throws(SystemError) {
        let key = key(name)
        try disk.withLiveState(disk.generation, key) { (state) throws(SystemError) in
            guard state.names.removeValue(forKey: key) != nil else { throw SystemError("unlink", key, errno: ENOENT) }
            state.unsyncedNames.append(.unlink(key))
        }
    }

    func rename(_ from: String, to: String) throws(SystemError) {
        let source = key(from)
        let target = key(to)
        try disk.withLiveState(disk.generation, source) { (state) throws(SystemError) in
            guard let node = state.names.removeValue(forKey: source) else { throw SystemError("rename", source, errno: ENOENT) }
            state.names[target] = node
            // One change: a rename is atomic even when only part of the directory's changes survive.
            state.unsyncedNames.append(.unlink(source))
            state.unsyncedNames.append(.link(target, node))
        }
    }

    func sync() throws(SystemError) {
        try disk.withLiveState(disk.generation, path) { state in
            state.durableNames = state.names
            state.unsyncedNames = []
        }
    }
}

private final class SimulatedFile: StorageFile {
    let disk: SimulatedDisk
    let node: Int
    let name: String
    let generation: Int
    /// Opened for direct I/O: misaligned writes fail with EINVAL, as O_DIRECT's do.
    let direct: Bool

    init(disk: SimulatedDisk, node: Int, name: String, generation: Int, direct: Bool) {
        self.disk = disk
        self.node = node
        self.name = name
        self.generation = generation
        self.direct = direct
    }

    private func withNode<T>(_ body: (inout SimulatedDisk.Node) throws(SystemError) -> T) throws(SystemError) -> T {
        try disk.withLiveState(generation, name) { (state) throws(SystemError) -> T in
            try body(&state.nodes[node]!)
        }
    }

    func size() throws(SystemError) -> UInt64 {
        try withNode { UInt64($0.current.count) }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        try withNode { node in
            let start = min(Int(offset), node.current.count)
            let count = min(buffer.count, node.current.count - start)
            node.current.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + start, byteCount: count) }
            return count
        }
    }

    func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SystemError) {
        if direct {
            let alignment = StorageAlignment.direct
            let aligned = offset % UInt64(alignment) == 0
                && buffers.allSatisfy { $0.count % alignment == 0 && Int(bitPattern: $0.baseAddress) % alignment == 0 }
            if !aligned { throw SystemError("write", "\(name) (direct I/O, misaligned)", errno: EINVAL) }
        }
        var bytes: [UInt8] = []
        for buffer in buffers { bytes.append(contentsOf: buffer) }
        try record(.write(offset: Int(offset), bytes: bytes))
    }

    private func record(_ change: SimulatedDisk.Change) throws(SystemError) {
        try withNode { node in
            SimulatedDisk.apply(change, to: &node.current)
            node.unsynced.append(change)
        }
    }

    func sync() throws(SystemError) {
        try disk.withLiveState(generation, name) { state in
            state.nodes[node]!.durable = state.nodes[node]!.current
            state.nodes[node]!.unsynced = []
        }
    }

    func truncate(to size: UInt64) throws(SystemError) {
        try record(.truncate(size: Int(size)))
    }

    func preallocate(_ length: UInt64) throws(SystemError) {
        try withNode { _ in }
    }

    func zero(offset: UInt64, length: UInt64, keepAllocated: Bool) throws(SystemError) {
        let size = try self.size()
        let end = min(offset + length, size)
        guard end > offset else { return }
        try record(.write(offset: Int(offset), bytes: [UInt8](repeating: 0, count: Int(end - offset))))
    }
}
