import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// Who has a block device open, in words an operator can act on: the devices stacked on it
/// (sysfs holders: device-mapper, md), the mount points, and the processes with it open. The
/// kernel's refusal of an exclusive open catches what none of these shows.
public enum DeviceUsers {
    /// Empty when nothing uses `/dev/<name>` (a kernel name such as "nbd0"). `aliases` are other
    /// paths of the device (symlinks) a process may have opened it by.
    public static func of(_ name: String, aliases: [String] = []) -> [String] {
        var users: [String] = []
        let holders = ((try? POSIXDirectory(path: "/sys/block/\(name)/holders").list()) ?? []).sorted()
        for holder in holders {
            let mapped = readText("/sys/block/\(holder)/dm/name").map { " (\($0))" } ?? ""
            users.append("device \(holder)\(mapped) is stacked on it")
        }
        if let number = readText("/sys/block/\(name)/dev") {
            users += mountPoints(of: number).map { "it is mounted at \($0)" }
        }
        users += processes(opening: ["/dev/\(name)"] + aliases)
        if users.isEmpty, exclusiveOpenRefused("/dev/\(name)") {
            users.append("the kernel refuses an exclusive open (something in the kernel holds it)")
        }
        return users
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

    private static func processes(opening paths: [String]) -> [String] {
        let me = getpid()
        var found: [String] = []
        for entry in ((try? POSIXDirectory(path: "/proc").list()) ?? []) {
            guard let pid = Int32(entry), pid != me else { continue }
            let descriptors = (try? POSIXDirectory(path: "/proc/\(entry)/fd").list()) ?? []
            if descriptors.contains(where: { fd in readLink("/proc/\(entry)/fd/\(fd)").map(paths.contains) ?? false }) {
                found.append("process \(pid) (\(readText("/proc/\(entry)/comm") ?? "?")) has it open")
            }
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

    private static func readLink(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
