import BlockStore
import ControlProtocol
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import ServiceLifecycle
import Testing

@testable import Daemon
@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// marsd in-process: the StandaloneServer service with a root, a control socket and an NBD socket,
/// driven through ControlClient (marsadm's client) and TestClient (NBD). This is the logged NBD
/// path end to end (dispatchLogged, the log engine, writeback) and the daemon's commands.
final class DaemonHarness {
    let directory: String
    var root: String { directory + "/root" }
    var control: String { directory + "/ctl.sock" }
    var nbd: String { directory + "/nbd.sock" }
    private var group: ServiceGroup?
    private var running: Task<Void, any Error>?

    init() {
        var template = Array("/var/tmp/marsd-daemon-XXXXXX".utf8CString)
        directory = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    func image(_ name: String, size: Int) -> String {
        let path = directory + "/" + name
        let fd = open(path, O_CREAT | O_RDWR, 0o600)
        precondition(fd >= 0 && ftruncate(fd, off_t(size)) == 0)
        close(fd)
        return path
    }

    /// `peer`: where it listens for other marsd (none: a host on its own).
    func start(peer: String? = nil) async throws {
        var configuration = ServeConfiguration()
        configuration.resources.root = root
        configuration.resources.peerAddress = peer
        configuration.resources.segmentSize = 1 << 20
        configuration.resources.spaceLimit = 128 << 20
        configuration.controlSocketPath = control
        configuration.nbd.unixSocketPath = nbd
        configuration.eventLoopThreads = 2
        var logger = Logger(label: "daemon-test " + (peer ?? directory))
        // MARS_TEST_LOG_LEVEL=notice (or debug...) shows what the in-process marsd log.
        logger.logLevel = getenv("MARS_TEST_LOG_LEVEL").flatMap { Logger.Level(rawValue: String(cString: $0)) } ?? .critical
        let service = StandaloneServer(configuration: configuration, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: service)], logger: logger))
        self.group = group
        running = Task { try await group.run() }
        for _ in 0..<200 where access(control, F_OK) != 0 { try await Task.sleep(for: .milliseconds(25)) }
        try #require(access(control, F_OK) == 0, "marsd did not start")
    }

    /// Starts marsd in a new cluster with resource vm1 on an image of `size` bytes; returns the image's path.
    func startWithResource(size: Int) async throws -> String {
        let path = image("vm1.img", size: size)
        try await start()
        #expect(try send(ControlRequest(command: .createCluster, host: "alpha")).error == nil)
        #expect(try send(ControlRequest(command: .createResource, name: "vm1", device: path)).error == nil)
        return path
    }

    func stop() async throws {
        await group?.triggerGracefulShutdown()
        try await running?.value
        group = nil
        running = nil
    }

    func send(_ request: ControlRequest) throws -> ControlResponse {
        try ControlClient.send(request, to: control, timeout: .seconds(60))
    }

    func remove() { _ = system("rm -rf '\(directory)'") }
}

@Suite("marsd in-process: resources over NBD and the control socket", .serialized)
struct DaemonTests {
    /// A resource end to end: create-cluster, create-resource, writes through the log (FUA, FLUSH,
    /// trim, write-zeroes) read back before writeback, down writes them to the device and says so,
    /// a restart brings the resource back with its data; view reports it all.
    @Test func aResourceOverNBDAndTheControlSocket() async throws {
        let harness = DaemonHarness()
        defer { harness.remove() }
        let image = harness.image("vm1.img", size: 8 << 20)
        try await harness.start()
        #expect(try harness.send(ControlRequest(command: .createResource, name: "vm1", device: image)).error?.contains("create-cluster") == true)
        #expect(try harness.send(ControlRequest(command: .createCluster, host: "alpha")).error == nil)
        let created = try harness.send(ControlRequest(command: .createResource, name: "vm1", device: image))
        #expect(created.error == nil)
        #expect(created.status?.resources.map(\.state) == ["up"])
        #expect(created.status?.exports.first?.size == 8 << 20)

        let client = try TestClient.connected(harness.nbd, export: "vm1")
        #expect(client.exportSize == 8 << 20)
        let data = pattern(65536, seed: 5)
        #expect(try client.write(data, at: 4096) == 0)
        #expect(try client.write(Array(data[0..<512]), at: 1 << 20, flags: .fua) == 0)
        #expect(try client.command(.trim, offset: 8192, length: 4096) == 0)
        #expect(try client.command(.writeZeroes, offset: 16384, length: 4096) == 0)
        #expect(try client.command(.flush) == 0)
        var expected = data
        expected.replaceSubrange(4096..<8192, with: [UInt8](repeating: 0, count: 4096))
        expected.replaceSubrange(12288..<16384, with: [UInt8](repeating: 0, count: 4096))
        #expect(try client.read(65536, at: 4096) == expected)
        #expect(try client.write([1], at: 8 << 20) == UInt32(NBDError.noSpace.rawValue), "a write past the end is ENOSPC")

        let view = try harness.send(ControlRequest(command: .view))
        let log = try #require(view.status?.resources.first?.log)
        #expect(log.durableLSN == log.appendedLSN && log.appendedLSN > 65536)

        let down = try harness.send(ControlRequest(command: .down, name: "vm1"))
        #expect(down.error == nil && down.message == "resource vm1 is down; its log is written back")
        #expect(down.status?.resources.first?.state == "down" && down.status?.resources.first?.error == nil)
        let device = try BlockDevice(path: image)
        #expect(try POSIXFile(device: device).read(count: 65536, at: 4096) == expected)
        // The name is known but not served: a client hears why.
        #expect(throws: (any Error).self) { try TestClient.connected(harness.nbd, export: "vm1") }

        #expect(try harness.send(ControlRequest(command: .up, name: "vm1")).error == nil)
        try await harness.stop()
        try await harness.start()
        let again = try TestClient.connected(harness.nbd, export: "vm1")
        #expect(try again.read(65536, at: 4096) == expected)
        #expect(try again.read(512, at: 1 << 20) == Array(data[0..<512]))
        try await harness.stop()
    }

    /// resize on one host: refused with the reason while the device is too small, to shrink without
    /// --force, for an unknown resource; then the size grows online (a connection made before
    /// may use the new end, new ones are told it), survives a restart, and a forced shrink cuts
    /// clients off at the new end.
    @Test func resizeOnline() async throws {
        let harness = DaemonHarness()
        defer { harness.remove() }
        let image = try await harness.startWithResource(size: 8 << 20)
        let before = try TestClient.connected(harness.nbd, export: "vm1")

        let unknown = try harness.send(ControlRequest(command: .resize, name: "nope", size: 16 << 20))
        #expect(unknown.error?.contains("there is no resource 'nope'") == true)
        let tooSmall = try harness.send(ControlRequest(command: .resize, name: "vm1", size: 16 << 20))
        #expect(tooSmall.error?.contains("has 8388608 bytes, less than 16777216: grow it first") == true, "\(tooSmall)")
        let shrink = try harness.send(ControlRequest(command: .resize, name: "vm1", size: 4 << 20))
        #expect(shrink.error?.contains("--force") == true, "\(shrink)")
        // Nothing half-made: the size is what it was, and no resize is pending.
        let unchanged = try harness.send(ControlRequest(command: .view)).status?.resources.first
        #expect(unchanged?.size == 8 << 20 && unchanged?.resize == nil)
        #expect(try before.write([1], at: 8 << 20) == UInt32(NBDError.noSpace.rawValue))

        #expect(truncate(image, 16 << 20) == 0)
        let grown = try harness.send(ControlRequest(command: .resize, name: "vm1", size: 16 << 20))
        #expect(grown.error == nil && grown.message == "resource vm1 has 16777216 bytes now", "\(grown)")
        #expect(grown.status?.resources.first?.size == 16 << 20 && grown.status?.exports.first?.size == 16 << 20)
        let tail = pattern(65536, seed: 9)
        #expect(try before.write(tail, at: 12 << 20, flags: .fua) == 0, "the connection made before the resize uses the new end")
        #expect(try TestClient.connected(harness.nbd, export: "vm1").exportSize == 16 << 20)
        #expect(try harness.send(ControlRequest(command: .resize, name: "vm1", size: 16 << 20)).message == "resource vm1 has 16777216 bytes already")

        try await harness.stop()
        try await harness.start()
        let restarted = try TestClient.connected(harness.nbd, export: "vm1")
        #expect(restarted.exportSize == 16 << 20)
        #expect(try restarted.read(65536, at: 12 << 20) == tail)

        let forced = try harness.send(ControlRequest(command: .resize, name: "vm1", force: true, size: 12 << 20))
        #expect(forced.error == nil && forced.status?.resources.first?.size == 12 << 20, "\(forced)")
        #expect(try restarted.write([1], at: 12 << 20) == UInt32(NBDError.noSpace.rawValue), "the forced shrink cuts connections off")
        #expect(try TestClient.connected(harness.nbd, export: "vm1").exportSize == 12 << 20)
        try await harness.stop()
    }

    /// A WRITE larger than a log record (accepted up to 64 MiB, records hold 32 MiB) is logged as
    /// consecutive records, acknowledged once all are durable (FUA), read back through the log, and
    /// written back whole.
    @Test func aWriteLargerThanALogRecord() async throws {
        let harness = DaemonHarness()
        defer { harness.remove() }
        let image = try await harness.startWithResource(size: 96 << 20)
        let client = try TestClient.connected(harness.nbd, export: "vm1")
        let data = pattern(Int(NBDLimits.advertisedMaxPayload) + (8 << 20) + 512, seed: 6)
        let offset: UInt64 = (1 << 20) + 512
        #expect(try client.write(data, at: offset, flags: .fua) == 0)
        #expect(try client.read(data.count, at: offset) == data)
        let view = try harness.send(ControlRequest(command: .view))
        let log = try #require(view.status?.resources.first?.log)
        #expect(log.durableLSN == log.appendedLSN && log.appendedLSN > UInt64(data.count))
        #expect(try harness.send(ControlRequest(command: .down, name: "vm1")).error == nil)
        let device = try BlockDevice(path: image)
        #expect(try POSIXFile(device: device).read(count: data.count, at: offset) == data)
        try await harness.stop()
    }

    /// Resources that are wanted up are pending before marsd's listeners open, so a client that
    /// connects at once waits for their recovery; view calls them recovering meanwhile.
    @Test func wantedResourcesArePendingBeforeTheListenersOpen() async throws {
        let harness = DaemonHarness()
        defer { harness.remove() }
        let image = harness.image("vm1.img", size: 4 << 20)
        let other = harness.image("vm2.img", size: 4 << 20)
        try await harness.start()
        _ = try harness.send(ControlRequest(command: .createCluster, host: "alpha"))
        _ = try harness.send(ControlRequest(command: .createResource, name: "vm1", device: image))
        _ = try harness.send(ControlRequest(command: .createResource, name: "vm2", device: other))
        _ = try harness.send(ControlRequest(command: .down, name: "vm2"))
        try await harness.stop()

        var logger = Logger(label: "daemon-test")
        logger.logLevel = .critical
        var settings = ResourceSettings()
        settings.root = harness.root
        let exports = ExportTable()
        let peerGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let manager = try ResourceManager(settings: settings, exports: exports, peerGroup: peerGroup, logger: logger)
        manager.expectWanted()
        #expect(exports.isPending("vm1") && !exports.isPending("vm2"))
        #expect(manager.status().map(\.state) == ["recovering", "down"])
        #expect(exports.catalog.missingMessage("vm2").contains("resource vm2 is down"))
        await manager.restore()
        #expect(!exports.isPending("vm1") && exports.exports.map(\.descriptor.name) == ["vm1"])
        #expect(manager.status().map(\.state) == ["up", "down"])
        await manager.shutdown()
        try await peerGroup.shutdownGracefully()
    }

    /// The control protocol: requests and replies survive the JSON line encoding, a malformed
    /// request is answered with an error (not dropped), and an unreachable socket is explained.
    @Test func controlProtocol() async throws {
        let request = ControlRequest(command: .createResource, name: "vm1", device: "/dev/vg/vm1")
        let line = try ControlCodec.encodeLine(request)
        #expect(line.last == 0x0A && !line.dropLast().contains(0x0A))
        #expect(try ControlCodec.decode(ControlRequest.self, from: line.dropLast()) == request)
        #expect(throws: (any Error).self) { try ControlCodec.decode(ControlRequest.self, from: Array(#"{"command":"explode"}"#.utf8)) }

        let harness = DaemonHarness()
        defer { harness.remove() }
        do {
            _ = try ControlClient.send(ControlRequest(command: .view), to: harness.control, timeout: .seconds(5))
            Issue.record("a missing socket was reached")
        } catch {
            #expect("\(error)".contains("Is marsd running"))
        }
        try await harness.start()
        let raw = try rawExchange(harness.control, "{\"command\":\"explode\"}\n")
        let response = try ControlCodec.decode(ControlResponse.self, from: Array(raw.utf8).dropLast())
        #expect(response.error?.hasPrefix("malformed control request") == true)
        #expect(try harness.send(ControlRequest(command: .down, name: "nope")).error?.contains("no resource 'nope'") == true)
        try await harness.stop()
    }

    /// The view table shows a resource's error line (a down that left writes off the device).
    @Test func statusTableShowsProblems() {
        let status = DaemonStatus(
            version: "0", pid: 1, ioEngine: "posix", listeners: [], root: "/mars", host: "a", cluster: "c",
            resources: [ResourceStatus(name: "vm1", device: "/d", size: 1, role: "primary", wanted: "down", state: "down", error: "down with acknowledged writes missing from the data device: x")],
            exports: []
        )
        let text = StatusTable.render(status)
        #expect(text.contains("vm1: down with acknowledged writes missing from the data device: x"))
        #expect(text.split(separator: "\n").contains { $0.hasPrefix("vm1 ") && $0.contains("primary  down    down") })
    }
}

/// Sends `text` to a Unix socket and returns everything it answers until it closes.
private func rawExchange(_ path: String, _ text: String) throws -> String {
    let client = try TestClient(socketPath: path)
    try client.send(Array(text.utf8))
    var bytes: [UInt8] = []
    var byte: UInt8 = 0
    while recv(client.fd, &byte, 1, 0) == 1 { bytes.append(byte) }
    return String(decoding: bytes, as: UTF8.self)
}

/// The marsadm binary next to this test build (swift build --build-tests builds it too).
private let marsadmPath: String = {
    var path = #filePath
    for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
    return path + "/.build/debug/marsadm"
}()

/// Runs marsadm; returns its exit status, its standard output, and both outputs together.
private func marsadm(_ arguments: [String]) throws -> (status: Int32, output: String, stdout: String) {
    var out: [Int32] = [0, 0]
    var err: [Int32] = [0, 0]
    precondition(pipe(&out) == 0 && pipe(&err) == 0)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_adddup2(&actions, out[1], 1)
    posix_spawn_file_actions_adddup2(&actions, err[1], 2)
    posix_spawn_file_actions_addclose(&actions, out[0])
    posix_spawn_file_actions_addclose(&actions, err[0])
    let argv = ([marsadmPath] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let rc = posix_spawn(&pid, marsadmPath, &actions, nil, argv, environ)
    posix_spawn_file_actions_destroy(&actions)
    close(out[1])
    close(err[1])
    defer { close(out[0]); close(err[0]) }
    guard rc == 0 else { throw ClientError(description: "cannot run \(marsadmPath): \(rc)") }
    func drain(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
    let stdout = drain(out[0])  // small outputs: the pipes never fill while the other is read
    let stderr = drain(err[0])
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    return ((status >> 8) & 0xFF, stdout + stderr, stdout)
}

/// A control socket that answers one request with `reply` (as a misbehaving or failing marsd would).
private func fakeMarsd(_ path: String, reply: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        let bytes = Array(path.utf8)
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0, listen(fd, 1) == 0 else { throw ClientError(description: "cannot listen on \(path)") }
    return fd
}

@Suite("marsadm against marsd", .serialized)
struct MarsadmTests {
    /// Exit status and output of the commands scripts rely on: success prints the message (or JSON),
    /// a refusal exits 1 and says what marsd said, with --json as a JSON object too.
    @Test func exitStatusAndOutput() async throws {
        guard access(marsadmPath, X_OK) == 0 else {
            print("SKIP marsadm tests: \(marsadmPath) is not built (swift build --build-tests builds it)")
            return
        }
        let harness = DaemonHarness()
        defer { harness.remove() }
        let image = harness.image("vm1.img", size: 4 << 20)
        try await harness.start()
        let control = ["--control", harness.control]
        var result = try await onThread { try marsadm(["create-cluster", "--host", "alpha"] + control) }
        #expect(result.status == 0 && result.output.contains("with this host as 'alpha'"))
        result = try await onThread { try marsadm(["create-resource", "vm1", image] + control) }
        #expect(result.status == 0)
        result = try await onThread { try marsadm(["view", "--json"] + control) }
        #expect(result.status == 0)
        let status = try ControlCodec.decode(DaemonStatus.self, from: Array(result.stdout.utf8))
        #expect(status.resources.map(\.name) == ["vm1"] && status.host == "alpha")
        result = try await onThread { try marsadm(["down", "nope"] + control) }
        #expect(result.status == 1 && result.output.contains("marsd refused: there is no resource 'nope'"))
        result = try await onThread { try marsadm(["down", "nope", "--json"] + control) }
        #expect(result.status == 1)
        #expect(try ControlCodec.decode(ControlResponse.self, from: Array(result.stdout.utf8)).error?.contains("no resource 'nope'") == true)
        try await harness.stop()
    }

    /// A down that marsd reports as incomplete (the device lacks acknowledged writes) makes marsadm
    /// exit non-zero with marsd's words.
    @Test func anIncompleteDownFails() async throws {
        guard access(marsadmPath, X_OK) == 0 else {
            print("SKIP marsadm tests: \(marsadmPath) is not built")
            return
        }
        let harness = DaemonHarness()
        defer { harness.remove() }
        let listener = try fakeMarsd(harness.control, reply: "")
        defer { close(listener) }
        let problem = "resource vm1 is down, but the data device does not hold every acknowledged write: the changes at LSN 1..<2 are in the log"
        let server = Task {
            try await onThread {
                let connection = accept(listener, nil, nil)
                var byte: UInt8 = 0
                while recv(connection, &byte, 1, 0) == 1, byte != 0x0A {}
                let reply = try ControlCodec.encodeLine(ControlResponse(error: problem))
                _ = reply.withUnsafeBytes { Glibc.send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                close(connection)
            }
        }
        let control = harness.control
        let result = try await onThread { try marsadm(["down", "vm1", "--control", control]) }
        try await server.value
        #expect(result.status == 1)
        #expect(result.output.contains(problem))
    }
}
