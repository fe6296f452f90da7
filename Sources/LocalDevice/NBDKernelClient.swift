import BlockStore
import CNBDKernel
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Which interface of the kernel's NBD client marsd drives (`marsd serve --nbd-interface`).
public enum NBDInterface: String, Sendable, CaseIterable {
    /// Netlink when the kernel has it, else ioctl.
    case auto
    /// Generic netlink (Linux 4.10+): the device outlives marsd and waits for it to come back.
    case netlink
    /// NBD_SET_SOCK and NBD_DO_IT: the device lives only while marsd runs.
    case ioctl

    /// The interface a new device gets: `auto` takes netlink when the kernel has the "nbd" family.
    public func resolved(netlinkAvailable: Bool) -> NBDInterface {
        switch self {
        case .auto: netlinkAvailable ? .netlink : .ioctl
        case .netlink, .ioctl: self
        }
    }
}

/// The kernel's NBD client (nbd.ko). Over generic netlink the device stays configured without a
/// process holding it, and survives the death of its server's connection for
/// `deadConnectionTimeout` seconds, waiting for a reconfigure with a new socket. Over ioctl, a
/// thread of marsd blocks in NBD_DO_IT for as long as the device lives; the device dies with marsd.
public final class NBDKernelClient: Sendable {
    /// Seconds a request waits for a reply before the kernel declares the connection dead (and
    /// requeues the request, which then waits for a reconnect; over ioctl the device fails).
    public static let requestTimeout: UInt64 = 30
    /// Seconds the device waits for marsd to come back (a restart re-attaches it) before its
    /// requests fail. Netlink only.
    public static let deadConnectionTimeout: UInt64 = 600
    static let blockSize: UInt64 = 4096

    public let interface: NBDInterface
    private let sysBlock: String
    /// The ioctl devices this process serves (each has a thread in NBD_DO_IT), by index. Every
    /// other attached device was set up over netlink.
    private let ioctlDevices = Mutex<[Int32: IoctlDevice]>([:])

    public init(interface: NBDInterface = .auto, sysBlock: String = "/sys/block") {
        self.interface = interface
        self.sysBlock = sysBlock
    }

    /// The interface a device connected now gets.
    public func interfaceForNewDevice() -> NBDInterface {
        interface.resolved(netlinkAvailable: cnbd_netlink_available() == 1)
    }

    /// The interface `/dev/nbd<index>`, attached by this marsd or an earlier one, was set up with.
    public func interface(of index: Int32) -> NBDInterface {
        ioctlDevices.withLock { $0[index] } == nil ? .netlink : .ioctl
    }

    /// Connects `/dev/nbd<index>` (any free device when nil, or when it is taken over ioctl) to
    /// `socket`. Returns the index.
    public func connect(socket: Int32, export: NegotiatedExport, index: Int32?) throws(SystemError) -> Int32 {
        if interfaceForNewDevice() == .ioctl { return try connectOverIoctl(socket: socket, export: export, preferring: index) }
        var assigned = index ?? -1
        var sockets = [socket]
        try Syscall.check(
            "NBD_CMD_CONNECT", index.map { "/dev/nbd\($0)" } ?? "a free /dev/nbd device",
            cnbd_connect(
                &sockets, 1, export.size, Self.blockSize, UInt64(export.transmissionFlags), Self.requestTimeout, Self.deadConnectionTimeout,
                &assigned)
        )
        return assigned
    }

    /// Hands `/dev/nbd<index>` a new socket in place of its dead one. Only a netlink device
    /// outlives its connection, so this is netlink's NBD_CMD_RECONFIGURE.
    public func reconnect(index: Int32, socket: Int32) throws(SystemError) {
        var sockets = [socket]
        try Syscall.check("NBD_CMD_RECONFIGURE", "/dev/nbd\(index)", cnbd_reconfigure(index, &sockets, 1))
    }

    /// Gives connected `/dev/nbd<index>` a new size while it stays connected and in use. Over
    /// netlink only NBD_CMD_RECONFIGURE can (the kernel refuses NBD_SET_SIZE and every other ioctl
    /// there but DISCONNECT and CLEAR_SOCK, and it never asks the server for the size again).
    public func resize(index: Int32, to size: UInt64) throws(SystemError) {
        guard interface(of: index) == .ioctl else {
            try Syscall.check("NBD_CMD_RECONFIGURE (size)", "/dev/nbd\(index)", cnbd_resize(index, size))
            return
        }
        try withDevice(index) { device throws(SystemError) in
            try Syscall.check("NBD_SET_SIZE", "/dev/nbd\(index)", cnbd_ioctl_resize(device, size))
        }
    }

    /// Ends the connection of `/dev/nbd<index>`; the device goes back to size 0. Over ioctl it
    /// returns once the thread in NBD_DO_IT has.
    public func disconnect(index: Int32) throws(SystemError) {
        guard let served = ioctlDevices.withLock({ $0[index] }) else {
            try Syscall.check("NBD_CMD_DISCONNECT", "/dev/nbd\(index)", cnbd_disconnect(index))
            return
        }
        try withDevice(index) { device throws(SystemError) in
            try Syscall.check("NBD_DISCONNECT", "/dev/nbd\(index)", cnbd_ioctl_disconnect(device))
        }
        guard served.waitUntilEnded(timeout: .seconds(10)) != nil else {
            throw SystemError("NBD_DO_IT (still serving 10 s after NBD_DISCONNECT)", "/dev/nbd\(index)", errno: ETIMEDOUT)
        }
    }

    /// Whether the kernel has `/dev/nbd<index>` configured: for netlink its NBD_CMD_STATUS,
    /// without netlink its sysfs pid file (present while a process serves it).
    public func isConnected(index: Int32) throws(SystemError) -> Bool {
        if ioctlDevices.withLock({ $0[index] }) != nil { return true }
        if interfaceForNewDevice() == .ioctl { return access("\(sysBlock)/nbd\(index)/pid", F_OK) == 0 }
        let result = cnbd_connected(index)
        try Syscall.check("NBD_CMD_STATUS", "/dev/nbd\(index)", result)
        return result == 1
    }

    /// The one message for a refusal of the kernel's NBD client: what happened, to which device
    /// (`error` names it), and what the operator does next.
    public static func explanation(of error: SystemError, interface: NBDInterface) -> String {
        switch (error.errno, interface) {
        case (ENOENT, .ioctl), (ENODEV, _):
            "\(error): the kernel has no NBD devices; 'modprobe nbd' loads its NBD client"
        case (ENOENT, _):
            "\(error): the kernel has no NBD netlink interface; 'modprobe nbd' loads it, and on a kernel without it (before 4.10) start marsd with --nbd-interface ioctl"
        case (EPERM, _), (EACCES, _):
            "\(error): setting up an NBD device needs root (CAP_SYS_ADMIN); run marsd as root"
        case (EBUSY, _):
            "\(error): every /dev/nbdN is in use; free one, or load more ('modprobe nbd nbds_max=N' while none is in use)"
        default:
            "\(error): the kernel's NBD client refused; its messages are in 'dmesg'"
        }
    }

    /// Indexes of the NBD devices in `sysBlock` that no process serves (no `pid` file), ascending.
    /// Empty when the kernel has none (nbd.ko not loaded).
    public static func freeDevices(sysBlock: String) -> [Int32] {
        let names = (try? POSIXDirectory(path: sysBlock).list()) ?? []
        return names.compactMap { name -> Int32? in
            guard name.hasPrefix("nbd"), let index = Int32(name.dropFirst(3)), index >= 0, String(index) == name.dropFirst(3) else { return nil }
            return access("\(sysBlock)/\(name)/pid", F_OK) == 0 ? nil : index
        }.sorted()
    }

    private func connectOverIoctl(socket: Int32, export: NegotiatedExport, preferring preferred: Int32?) throws(SystemError) -> Int32 {
        var candidates = Self.freeDevices(sysBlock: sysBlock)
        if candidates.isEmpty {
            let any = ((try? POSIXDirectory(path: sysBlock).list()) ?? []).contains { $0.hasPrefix("nbd") }
            throw SystemError("find a free NBD device in", sysBlock, errno: any ? EBUSY : ENODEV)
        }
        if let preferred, let position = candidates.firstIndex(of: preferred) { candidates.swapAt(0, position) }
        for index in candidates {
            let path = "/dev/nbd\(index)"
            let device = try Syscall.retrying("open", path) { open(path, O_RDWR | O_CLOEXEC) }
            let configured = cnbd_ioctl_configure(
                device, socket, export.size, Self.blockSize, UInt64(export.transmissionFlags), Self.requestTimeout)
            if configured == -EBUSY {  // another process is setting this one up: try the next
                close(device)
                continue
            }
            do {
                try Syscall.check("NBD_SET_SOCK/SIZE/FLAGS/TIMEOUT", path, configured)
            } catch {
                close(device)
                throw error
            }
            try serve(device, index: index)
            return index
        }
        throw SystemError("NBD_SET_SOCK", "every free /dev/nbd device (each is being set up by another process)", errno: EBUSY)
    }

    /// Starts the thread that blocks in NBD_DO_IT on `device` (and closes it when that returns:
    /// `device` is the thread's from here), and waits until the kernel runs the device (its sysfs
    /// pid file appears).
    private func serve(_ device: Int32, index: Int32) throws(SystemError) {
        let served = IoctlDevice()
        ioctlDevices.withLock { $0[index] = served }
        let started = DetachedThread.start { [self] in
            let result = cnbd_ioctl_serve(device)
            close(device)
            ioctlDevices.withLock { devices in
                if devices[index] === served { devices[index] = nil }
            }
            served.end(result)
        }
        guard started else {
            ioctlDevices.withLock { $0[index] = nil }
            close(device)
            throw SystemError("pthread_create (the thread for NBD_DO_IT of)", "/dev/nbd\(index)", errno: EAGAIN)
        }
        for _ in 0..<500 {
            if access("\(sysBlock)/nbd\(index)/pid", F_OK) == 0 { return }
            if let result = served.ended { throw SystemError("NBD_DO_IT", "/dev/nbd\(index)", errno: result < 0 ? -result : EIO) }
            usleep(10_000)
        }
        // Not left running behind a failed attach.
        try? withDevice(index) { device in _ = cnbd_ioctl_disconnect(device) }
        throw SystemError("NBD_DO_IT (not running after 5 s)", "/dev/nbd\(index)", errno: ETIMEDOUT)
    }

    /// Runs `body` with a descriptor of `/dev/nbd<index>` of its own (the serving thread's may be
    /// closing).
    private func withDevice(_ index: Int32, _ body: (Int32) throws(SystemError) -> Void) throws(SystemError) {
        let path = "/dev/nbd\(index)"
        let device = try Syscall.retrying("open", path) { open(path, O_RDWR | O_CLOEXEC) }
        defer { close(device) }
        try body(device)
    }
}

/// An ioctl device's serving thread, as seen from the others: NBD_DO_IT's result once it returned.
private final class IoctlDevice: Sendable {
    private let result = Mutex<Int32?>(nil)

    var ended: Int32? { result.withLock { $0 } }

    func end(_ value: Int32) { result.withLock { $0 = value } }

    /// NBD_DO_IT's result, or nil when it still runs after `timeout`.
    func waitUntilEnded(timeout: Duration) -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let ended { return ended }
            usleep(10_000)
        }
        return ended
    }
}

/// A thread of its own for a call that blocks as long as a device lives (not a pool's thread).
private enum DetachedThread {
    private final class Body {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// False when the system refused a new thread.
    static func start(_ body: @escaping @Sendable () -> Void) -> Bool {
        let argument = Unmanaged.passRetained(Body(body)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            Unmanaged<Body>.fromOpaque(argument!).takeRetainedValue().run()
            return nil
        }, argument)
        guard result == 0 else {
            Unmanaged<Body>.fromOpaque(argument).release()
            return false
        }
        pthread_detach(thread)
        return true
    }
}
