import BlockStore
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import Testing

@testable import LocalDevice
@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

private func temporaryDirectory() -> String {
    var template = Array("/var/tmp/marsd-local-XXXXXX".utf8CString)
    return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
}

@Suite("Local devices: the NBD handshake for the kernel, /dev/mars links, mount points", .serialized)
struct LocalDeviceTests {
    /// The handshake the kernel's NBD client relies on: against marsd's own server it yields the
    /// export's size and flags, and leaves the socket in transmission phase (a raw NBD READ works).
    @Test func handshakeWithMarsdsServer() async throws {
        let directory = temporaryDirectory()
        defer { _ = system("rm -rf '\(directory)'") }
        let image = directory + "/disk.img"
        let fd = open(image, O_CREAT | O_RDWR, 0o600)
        #expect(ftruncate(fd, 3 << 20) == 0)
        #expect(pwrite(fd, [UInt8](repeating: 0xAB, count: 512), 512, 4096) == 512)
        close(fd)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        var configuration = NBDServerConfiguration()
        configuration.unixSocketPath = directory + "/nbd.sock"
        var logger = Logger(label: "test")
        logger.logLevel = .critical
        let server = try NBDServer(
            exports: ExportTable([ServedExport(name: "vm1", device: try BlockDevice(path: image))]), configuration: configuration,
            group: group, logger: logger
        )
        try await server.start()
        defer { Task { await server.stop(); try? await group.shutdownGracefully() } }

        let (socket, export) = try NBDClientHandshake.connect(unixSocket: directory + "/nbd.sock", export: "vm1", timeoutSeconds: 5)
        defer { close(socket) }
        #expect(export.size == 3 << 20)
        let flags = NBDTransmissionFlags(rawValue: export.transmissionFlags)
        #expect(flags.contains(.hasFlags) && flags.contains(.sendFlush) && !flags.contains(.readOnly))
        // NBD_CMD_READ of 512 bytes at 4096, handle 7: the simple reply carries the data.
        var request: [UInt8] = [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0]
        request += [0, 0, 0, 0, 0, 0, 0, 7] + [0, 0, 0, 0, 0, 0, 0x10, 0] + [0, 0, 2, 0]
        #expect(write(socket, request, request.count) == request.count)
        var reply = [UInt8](repeating: 0, count: 16 + 512)
        var got = 0
        while got < reply.count {
            let n = reply.withUnsafeMutableBytes { read(socket, $0.baseAddress! + got, $0.count - got) }
            guard n > 0 else { break }
            got += n
        }
        #expect(got == reply.count)
        #expect(Array(reply[4..<8]) == [0, 0, 0, 0])  // no error
        #expect(Array(reply[16...]) == [UInt8](repeating: 0xAB, count: 512))

        // An export the server does not have: the error names it and carries the server's reason.
        #expect {
            _ = try NBDClientHandshake.connect(unixSocket: directory + "/nbd.sock", export: "nosuch", timeoutSeconds: 5)
        } throws: { error in
            "\(error)".contains("refused export nosuch")
        }
    }

    /// Something that is not an NBD server gets a clear error, not a hang; a missing socket names the path.
    @Test func handshakeWithSomethingElse() throws {
        let directory = temporaryDirectory()
        defer { _ = system("rm -rf '\(directory)'") }
        #expect {
            _ = try NBDClientHandshake.connect(unixSocket: directory + "/missing.sock", export: "vm1", timeoutSeconds: 1)
        } throws: { error in
            "\(error)".contains("connect to \(directory)/missing.sock") && "\(error)".contains("No such file")
        }
        // A listener that never says anything: the read times out.
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array((directory + "/silent.sock").utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path) }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(bound == 0 && listen(listener, 1) == 0)
        defer { close(listener) }
        #expect {
            _ = try NBDClientHandshake.connect(unixSocket: directory + "/silent.sock", export: "vm1", timeoutSeconds: 1)
        } throws: { error in
            "\(error)".contains("did not answer the NBD handshake in time")
        }
    }

    @Test func linksPointAtTheKernelDeviceAndAreReplacedAtomically() throws {
        let directory = temporaryDirectory()
        defer { _ = system("rm -rf '\(directory)'") }
        let links = DeviceLinks(directory: directory + "/mars")
        try links.create("vm1", target: "/dev/nbd3")
        #expect(links.target(of: "vm1") == "/dev/nbd3")
        try links.create("vm1", target: "/dev/nbd5")
        #expect(links.target(of: "vm1") == "/dev/nbd5")
        try links.remove("vm1")
        #expect(links.target(of: "vm1") == nil)
        try links.remove("vm1")  // gone already: fine
        // A directory that cannot be made is an error naming it.
        let blocked = DeviceLinks(directory: "/proc/mars-cannot-be-here")
        #expect { try blocked.create("vm1", target: "/dev/nbd0") } throws: { "\($0)".contains("mkdir /proc/mars-cannot-be-here") }
    }

    @Test func mountPointsOfADeviceFromMountinfo() {
        let mountinfo = """
            22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
            40 22 43:0 / /srv/ct\\040one rw,relatime shared:20 - ext4 /dev/nbd0 rw
            41 22 43:32 / /srv/other rw,relatime shared:21 - ext4 /dev/nbd1 rw
            42 22 43:0 /data /var/lib/bind rw,relatime shared:20 - ext4 /dev/nbd0 rw
            """
        #expect(DeviceUsers.mountPoints(of: "43:0", mountinfo: mountinfo) == ["/srv/ct one", "/var/lib/bind"])
        #expect(DeviceUsers.mountPoints(of: "43:64", mountinfo: mountinfo).isEmpty)
    }
}

@Suite("The kernel's NBD client: choosing netlink or ioctl, free devices, messages")
struct NBDKernelClientTests {
    /// auto takes netlink only when the kernel has the "nbd" family; a forced interface stays.
    @Test func interfaceSelection() {
        #expect(NBDInterface.auto.resolved(netlinkAvailable: true) == .netlink)
        #expect(NBDInterface.auto.resolved(netlinkAvailable: false) == .ioctl)
        #expect(NBDInterface.netlink.resolved(netlinkAvailable: false) == .netlink)
        #expect(NBDInterface.ioctl.resolved(netlinkAvailable: true) == .ioctl)
    }

    /// A device is free when sysfs has no pid file for it (no process serves it); other block
    /// devices and odd names are not NBD devices; the order is numeric.
    @Test func freeDevicesFromSysfs() throws {
        let sysBlock = temporaryDirectory()
        defer { _ = system("rm -rf '\(sysBlock)'") }
        for name in ["nbd0", "nbd1", "nbd2", "nbd10", "nbd9", "vda", "nbd", "nbdx", "nbd01", "loop0"] {
            #expect(mkdir("\(sysBlock)/\(name)", 0o755) == 0)
        }
        for served in ["nbd0", "nbd9", "loop0"] {
            let fd = open("\(sysBlock)/\(served)/pid", O_CREAT | O_WRONLY, 0o644)
            #expect(fd >= 0)
            close(fd)
        }
        #expect(NBDKernelClient.freeDevices(sysBlock: sysBlock) == [1, 2, 10])
    }

    /// Without nbd.ko there is no /sys/block/nbd*: nothing is free, and an ioctl connect says to load it.
    @Test func noDevicesWithoutTheModule() throws {
        let sysBlock = temporaryDirectory()
        defer { _ = system("rm -rf '\(sysBlock)'") }
        #expect(mkdir("\(sysBlock)/vda", 0o755) == 0)
        #expect(NBDKernelClient.freeDevices(sysBlock: sysBlock).isEmpty)
        #expect(NBDKernelClient.freeDevices(sysBlock: sysBlock + "/missing").isEmpty)
        let client = NBDKernelClient(interface: .ioctl, sysBlock: sysBlock)
        let export = NegotiatedExport(size: 1 << 20, transmissionFlags: 0)
        #expect(throws: SystemError("find a free NBD device in", sysBlock, errno: ENODEV)) {
            try client.connect(socket: -1, export: export, index: nil)
        }
    }

    /// Every refusal names what happened and to which device, and says what to do next.
    @Test func messagesSayWhatToDo() {
        let missing = SystemError("NBD_CMD_CONNECT", "a free /dev/nbd device", errno: ENOENT)
        #expect(NBDKernelClient.explanation(of: missing, interface: .netlink).contains("--nbd-interface ioctl"))
        #expect(NBDKernelClient.explanation(of: missing, interface: .netlink).contains("a free /dev/nbd device"))
        let node = SystemError("open", "/dev/nbd3", errno: ENOENT)
        #expect(NBDKernelClient.explanation(of: node, interface: .ioctl).contains("modprobe nbd"))
        #expect(NBDKernelClient.explanation(of: node, interface: .ioctl).contains("/dev/nbd3"))
        let busy = SystemError("NBD_SET_SOCK", "/dev/nbd0", errno: EBUSY)
        #expect(NBDKernelClient.explanation(of: busy, interface: .ioctl).contains("nbds_max"))
        let denied = SystemError("open", "/dev/nbd0", errno: EACCES)
        #expect(NBDKernelClient.explanation(of: denied, interface: .ioctl).contains("root"))
    }
}
