import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// Who has a block device open, in words an operator can act on: the devices stacked on it
/// (sysfs holders: device-mapper, md), the mount points, and the processes with it open. The
/// kernel's refusal of an exclusive open catches what none of these shows.
public enum DeviceUsers {
    /// Empty when nothing uses the block device at `path` (any path of it: the kernel name, a
    /// /dev/mapper node, a symlink). Processes are matched by device number, so any node counts.
    public static func of(_ path: String) -> [String] {
        var info = stat()
        guard stat(path, &info) == 0, info.st_mode & S_IFMT == S_IFBLK else { return [] }
        let number = deviceNumber(info.st_rdev)
        var users: [String] = []
        let holders = ((try? POSIXDirectory(path: "/sys/dev/block/\(number)/holders").list()) ?? []).sorted()
        for holder in holders {
            let mapped = readText("/sys/block/\(holder)/dm/name").map { " (\($0))" } ?? ""
            users.append("device \(holder)\(mapped) is stacked on it")
        }
        users += mountPoints(of: number).map { "it is mounted at \($0)" }
        users += processes(opening: info.st_rdev)
        if users.isEmpty, exclusiveOpenRefused(path) {
            users.append("the kernel refuses an exclusive open (something in the kernel holds it)")
        }
        return users
    }

    /// "MAJOR:MINOR" as sysfs and mountinfo write it (glibc's dev_t encoding).
    static func deviceNumber(_ rdev: dev_t) -> String {
        let value = UInt64(rdev)
        let major = ((value >> 8) & 0xfff) | ((value >> 32) & ~UInt64(0xfff))
        let minor = (value & 0xff) | ((value >> 12) & ~UInt64(0xff))
        return "\(major):\(minor)"
    }

    /// Mount points whose source is the device "MAJOR:MINOR", from /proc/self/mountinfo.
    static func mountPoints(of number: String, mountinfo: String? = readText("/proc/self/mountinfo")) -> [String] {
        guard let mountinfo else { return [] }
        return mountinfo.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4, fields[2] == number else { return nil }
            return unescape(String(fields[4]))
        }
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: String) -> String {
        var result = [UInt8]()
        let bytes = Array(field.utf8)
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count, let value = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                result.append(value)
                i += 4
            } else {
                result.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: result, as: UTF8.self)
    }

    private static func processes(opening device: dev_t) -> [String] {
        let me = getpid()
        var found: [String] = []
        for entry in ((try? POSIXDirectory(path: "/proc").list()) ?? []) {
            guard let pid = Int32(entry), pid != me else { continue }
            let descriptors = (try? POSIXDirectory(path: "/proc/\(entry)/fd").list()) ?? []
            let opened = descriptors.contains { fd in
                var info = stat()
                return stat("/proc/\(entry)/fd/\(fd)", &info) == 0 && info.st_mode & S_IFMT == S_IFBLK && info.st_rdev == device
            }
            if opened { found.append("process \(pid) (\(readText("/proc/\(entry)/comm") ?? "?")) has it open") }
        }
        return found
    }

    private static func exclusiveOpenRefused(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK)
        if fd >= 0 {
            close(fd)
            return false
        }
        return errno == EBUSY
    }

    /// A small text file (sysfs, procfs) without its trailing newline; nil when unreadable.
    static func readText(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            bytes += chunk[0..<n]
        }
        var text = String(decoding: bytes, as: UTF8.self)
        while text.hasSuffix("\n") { text.removeLast() }
        return text
    }
}
