import BlockStore
import CDeviceMapper
import CLVM

#if canImport(Glibc)
import Glibc
#endif

/// A refused or failed LVM operation, in words that say what to do.
public struct LVMError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Logical volumes of resources, made and removed through liblvm2cmd inside marsd (no lvm
/// process), and checked through libdevmapper before removal.
public enum LogicalVolumes {
    /// The device path of `volume` in `group`, as lvm links it.
    public static func path(_ volume: String, in group: String) -> String { "/dev/\(group)/\(volume)" }

    /// Creates `volume` of at least `size` bytes (lvm rounds up to whole extents, usually 4 MiB)
    /// in `group`. Nothing is created when it refuses.
    public static func create(_ volume: String, in group: String, size: UInt64) throws -> String {
        try validate(group, kind: "volume group")
        try validate(volume, kind: "logical volume")
        guard size > 0 else { throw LVMError("a logical volume needs a size above 0 bytes (--size)") }
        do {
            try run("vgs \(group)")
        } catch {
            throw LVMError("volume group \(group) does not exist on this host (vgs lists the volume groups): \(error)")
        }
        let device = path(volume, in: group)
        if access(device, F_OK) == 0 || (try? run("lvs \(group)/\(volume)")) != nil {
            throw LVMError("logical volume \(group)/\(volume) exists already: choose another resource name, or give its device path instead of --lvm")
        }
        do {
            try run("lvcreate --yes --wipesignatures y --zero y --name \(volume) --size \(size)b \(group)")
        } catch {
            throw LVMError("cannot create logical volume \(group)/\(volume) of \(size) bytes: \(error)")
        }
        // Without udev, lvm makes the node itself; with udev it appears shortly after.
        for _ in 0..<50 where access(device, F_OK) != 0 { usleep(100_000) }
        guard access(device, F_OK) == 0 else {
            try? run("lvremove --yes \(group)/\(volume)")
            throw LVMError("logical volume \(group)/\(volume) was created but \(device) did not appear; it is removed again")
        }
        return device
    }

    /// Grows `volume` in `group` to at least `size` bytes (whole extents), online: lvm's own
    /// reason when it refuses (not enough free space in the group), and then nothing changed.
    public static func extend(_ volume: String, in group: String, to size: UInt64) throws {
        try validate(group, kind: "volume group")
        try validate(volume, kind: "logical volume")
        do {
            try run("lvextend --yes --size \(size)b \(group)/\(volume)")
        } catch {
            throw LVMError("cannot grow logical volume \(group)/\(volume) to \(size) bytes: \(error)")
        }
    }

    /// How many opens the kernel counts on the logical volume at `device` (libdevmapper).
    public static func openCount(_ device: String) throws -> Int32 {
        var info = stat()
        guard stat(device, &info) == 0 else { throw SystemError("stat", device, errno: errno) }
        guard info.st_mode & S_IFMT == S_IFBLK else { throw LVMError("\(device) is not a block device") }
        var count: Int32 = 0
        // glibc's dev_t encoding (the major/minor macros are not imported into Swift).
        let rdev = UInt64(info.st_rdev)
        let major = UInt32(truncatingIfNeeded: ((rdev >> 8) & 0xfff) | ((rdev >> 32) & ~UInt64(0xfff)))
        let minor = UInt32(truncatingIfNeeded: (rdev & 0xff) | ((rdev >> 12) & ~UInt64(0xff)))
        try Syscall.check("device-mapper info of", device, cdm_open_count(major, minor, &count))
        return count
    }

    /// Removes `volume` from `group`, refusing while the kernel counts it open.
    public static func remove(_ volume: String, in group: String) throws {
        try validate(group, kind: "volume group")
        try validate(volume, kind: "logical volume")
        let device = path(volume, in: group)
        let count = try openCount(device)
        guard count == 0 else {
            throw LVMError("logical volume \(group)/\(volume) is open (the kernel counts \(count) opens): unmount it and stop what holds it, then remove it")
        }
        do {
            try run("lvremove --yes \(group)/\(volume)")
        } catch {
            throw LVMError("cannot remove logical volume \(group)/\(volume): \(error)")
        }
    }

    /// lvm2_run splits the command line at spaces and knows no quoting: names are checked to be
    /// plain lvm names (letters, digits, + _ . -, not starting with -).
    static func validate(_ name: String, kind: String) throws {
        let allowed = name.utf8.allSatisfy { byte in
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || byte == UInt8(ascii: "+") || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-")
        }
        guard !name.isEmpty, name.utf8.count <= 127, allowed, !name.hasPrefix("-"), name != ".", name != ".." else {
            throw LVMError("'\(name)' is not a valid \(kind) name: use letters, digits and + _ . - (not starting with -)")
        }
    }

    /// Runs an lvm command in this process; a failure carries lvm's own error messages.
    static func run(_ command: String) throws {
        var errors = [CChar](repeating: 0, count: 4096)
        let result = clvm_run(command, &errors, errors.count)
        guard result == CLVM_SUCCEEDED else {
            let message = String(decoding: errors.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw LVMError(message.isEmpty ? "lvm \(command.split(separator: " ").first ?? "") failed (code \(result))" : message)
        }
    }
}
