import BlockStore
import CNBDKernel

/// The kernel's NBD client (nbd.ko) over generic netlink: the device stays configured without a
/// process holding it, and survives the death of its server's connection for
/// `deadConnectionTimeout` seconds, waiting for a reconfigure with a new socket.
public enum NBDKernelClient {
    /// Seconds a request waits for a reply before the kernel declares the connection dead (and
    /// requeues the request, which then waits for a reconnect).
    public static let requestTimeout: UInt64 = 30
    /// Seconds the device waits for marsd to come back (a restart re-attaches it) before its
    /// requests fail.
    public static let deadConnectionTimeout: UInt64 = 600

    /// Connects `/dev/nbd<index>` (any free device when nil) to `socket`. Returns the index.
    public static func connect(socket: Int32, export: NegotiatedExport, index: Int32?) throws(SystemError) -> Int32 {
        var assigned = index ?? -1
        var sockets = [socket]
        try Syscall.check(
            "NBD_CMD_CONNECT", index.map { "/dev/nbd\($0)" } ?? "a free /dev/nbd device",
            cnbd_connect(&sockets, 1, export.size, 4096, UInt64(export.transmissionFlags), requestTimeout, deadConnectionTimeout, &assigned)
        )
        return assigned
    }

    /// Hands `/dev/nbd<index>` a new socket in place of its dead one.
    public static func reconnect(index: Int32, socket: Int32) throws(SystemError) {
        var sockets = [socket]
        try Syscall.check("NBD_CMD_RECONFIGURE", "/dev/nbd\(index)", cnbd_reconfigure(index, &sockets, 1))
    }

    /// Gives connected `/dev/nbd<index>` a new size while it stays connected and in use (the only
    /// way on a device set up over netlink: the kernel refuses NBD_SET_SIZE and every other ioctl
    /// there but DISCONNECT and CLEAR_SOCK, and it never asks the server for the size again).
    public static func resize(index: Int32, to size: UInt64) throws(SystemError) {
        try Syscall.check("NBD_CMD_RECONFIGURE (size)", "/dev/nbd\(index)", cnbd_resize(index, size))
    }

    public static func disconnect(index: Int32) throws(SystemError) {
        try Syscall.check("NBD_CMD_DISCONNECT", "/dev/nbd\(index)", cnbd_disconnect(index))
    }

    public static func isConnected(index: Int32) throws(SystemError) -> Bool {
        let result = cnbd_connected(index)
        try Syscall.check("NBD_CMD_STATUS", "/dev/nbd\(index)", result)
        return result == 1
    }
}
