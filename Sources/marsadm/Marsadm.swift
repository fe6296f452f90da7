import ArgumentParser
import ControlProtocol
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

@main
struct Marsadm: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "marsadm",
        abstract: "Operate swift-mars: clusters, resources, status and logs.",
        discussion: """
            marsadm talks to the marsd on this host over its control socket; log-dump and log-verify read \
            the log files under the root directly, so they also work while marsd is stopped. Every command \
            has machine-readable output with --json.
            """,
        version: marsVersion,
        subcommands: [
            CreateCluster.self, JoinCluster.self, CreateResource.self, JoinResource.self, Up.self, Down.self, Primary.self, Secondary.self, View.self,
            WaitResource.self, PauseFetch.self, ResumeFetch.self, PauseReplay.self, ResumeReplay.self, PauseSync.self, ResumeSync.self,
            Invalidate.self, LeaveResource.self, DeleteResource.self, LeaveCluster.self, Attach.self, Detach.self, Resize.self, LogDump.self,
            LogVerify.self,
        ]
    )
}

struct ControlOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The control socket of the local marsd (marsd --control).", valueName: "path"))
    var control = "/run/marsd/control.sock"

    @Option(help: ArgumentHelp("How long to wait for marsd's reply, in seconds.", valueName: "seconds"))
    var timeout: Double = 300

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func validate() throws {
        guard timeout > 0, timeout <= 86400 else { throw ValidationError("--timeout must be between 0 and 86400 seconds, not \(timeout)") }
    }

    /// Sends `request`; a refusal becomes an error naming what marsd said. With --json, every
    /// failure also prints a JSON object with an "error" field, so scripts need not parse stderr.
    func send(_ request: ControlRequest) throws -> ControlResponse {
        let response: ControlResponse
        do {
            response = try ControlClient.send(request, to: control, timeout: .milliseconds(Int64(timeout * 1000)))
        } catch {
            if json { print((try? ControlCodec.prettyJSON(ControlResponse(error: "\(error)"))) ?? "") }
            throw MarsadmError("\(error)")
        }
        if let error = response.error {
            if json { print((try? ControlCodec.prettyJSON(response)) ?? "") }
            throw MarsadmError("marsd refused: \(error)")
        }
        return response
    }

    /// Runs a command that changes something and prints what marsd did.
    func perform(_ request: ControlRequest) throws {
        let response = try send(request)
        if json {
            print(try ControlCodec.prettyJSON(response))
        } else if let message = response.message {
            print(message)
        }
    }

    /// A device path as marsd (running elsewhere) must see it: absolute.
    static func absolute(_ path: String) throws -> String {
        guard !path.hasPrefix("/") else { return path }
        guard let directory = getcwd(nil, 0) else { throw MarsadmError("cannot resolve \(path): getcwd failed") }
        defer { free(directory) }
        return String(cString: directory) + "/" + path
    }
}

struct CreateCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this host the first member of a new cluster.",
        discussion: """
            Writes the cluster identity under marsd's root and prints a join token: it holds the cluster id \
            and the secret every member proves it knows; keep it like a password. Run it once, on the first host.
            """
    )

    @Option(help: ArgumentHelp("This host's name in the cluster and in log segment names (default: the hostname).", valueName: "name"))
    var host: String?

    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .createCluster, host: host))
    }
}

struct CreateResource: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a resource on a data device, with this host as its primary.",
        discussion: """
            The resource's size is the device's size. The resource comes up at once: its NBD export \
            carries the resource's name, and every change to it is logged under ROOT/resource-NAME. \
            With --lvm VG --size SIZE instead of DEVICE, marsd creates the logical volume VG/NAME of that \
            size (through liblvm2cmd; lvm rounds it up to whole extents) as the data device; a refusal \
            (no such volume group, not enough free space, the name taken) leaves nothing behind.
            """
    )

    @Argument(help: ArgumentHelp("The resource name: \(SafeName.rule)."))
    var name: String

    @Argument(help: "The data device: a regular file or a block device (not with --lvm).")
    var device: String?

    @Option(help: ArgumentHelp("Create the data device as logical volume NAME in this volume group.", valueName: "vg"))
    var lvm: String?

    @Option(help: ArgumentHelp("The logical volume's size with --lvm: bytes, or with K, M, G, T (powers of 1024).", valueName: "size"))
    var size: String?

    @OptionGroup var options: ControlOptions

    func validate() throws {
        try validateDeviceChoice(device: device, lvm: lvm)
        if lvm != nil, size == nil { throw ValidationError("--lvm needs --size") }
        if lvm == nil, size != nil { throw ValidationError("--size goes with --lvm (without it, the size is the device's)") }
        if let size { _ = try parseSize(size) }
    }

    func run() throws {
        if let lvm {
            try options.perform(ControlRequest(command: .createResource, name: name, volumeGroup: lvm, size: try parseSize(size ?? "")))
            return
        }
        // marsd runs elsewhere: a relative path means the caller's directory, so send it absolute.
        try options.perform(ControlRequest(command: .createResource, name: name, device: try ControlOptions.absolute(device ?? "")))
    }
}

struct JoinCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join an existing cluster through one of its members.",
        discussion: """
            TOKEN is what 'marsadm create-cluster' printed on the first host. This marsd must run with --peer, \
            at an address the other members can reach. Both sides authenticate with the token's secret; the \
            cluster's members and resources then spread to this host by gossip.
            """
    )

    @Option(help: ArgumentHelp("This host's name in the cluster and in log segment names (default: the hostname).", valueName: "name"))
    var host: String?

    @Option(help: ArgumentHelp("The join token printed by create-cluster.", valueName: "token"))
    var token: String

    @Argument(help: ArgumentHelp("The peer address of any member: HOST:PORT (port 7777 when omitted).", valueName: "peer-address"))
    var peer: String

    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .joinCluster, host: host, token: token, peer: peer))
    }
}

struct JoinResource: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this host a secondary of a resource: initial sync, then asynchronous replication.",
        discussion: """
            The resource must exist in the cluster (created on its primary). DEVICE must be at least the resource's \
            size. The device is copied from the primary while it keeps writing (only chunks that differ cross \
            the network; zero chunks as a length), the log is fetched and replayed from the sync's start, and \
            the replica is UpToDate once replay passes the primary's position at the end of the copy. Until then \
            view shows it Inconsistent. The sync resumes where it was after a restart of either host. With \
            --lvm VG instead of DEVICE, marsd creates logical volume VG/NAME of the resource's size as the device.
            """
    )

    @Argument(help: "The resource name.")
    var name: String

    @Argument(help: "The local data device: a regular file or a block device (not with --lvm).")
    var device: String?

    @Option(help: ArgumentHelp("Create the data device as logical volume NAME in this volume group.", valueName: "vg"))
    var lvm: String?

    @OptionGroup var options: ControlOptions

    func validate() throws { try validateDeviceChoice(device: device, lvm: lvm) }

    func run() throws {
        if let lvm {
            try options.perform(ControlRequest(command: .joinResource, name: name, volumeGroup: lvm))
            return
        }
        try options.perform(ControlRequest(command: .joinResource, name: name, device: try ControlOptions.absolute(device ?? "")))
    }
}

struct WaitResource: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait until a resource reaches a state on this host.",
        discussion: """
            --until uptodate (the default): returns 0 once this host's replica has finished any sync and replayed \
            everything the primary had made durable when the command started. --until primary: once this host is \
            the resource's primary and serves its export. --until secondary: once this host is a secondary that \
            fetches from a designated primary. Non-zero, with what was reached, when --timeout seconds pass first.
            """
    )

    @Argument(help: "The resource name.")
    var name: String

    @Option(help: "What to wait for: uptodate, primary or secondary.")
    var until: ControlRequest.WaitTarget = .uptodate

    @OptionGroup var options: ControlOptions

    func run() throws {
        // --timeout is the wait here; marsd's reply comes at the latest when it ends.
        var options = options
        let wait = options.timeout
        options.timeout = wait + 30
        try options.perform(ControlRequest(command: .waitResource, name: name, timeout: wait, until: until))
    }
}

extension ControlRequest.WaitTarget: ExpressibleByArgument {}

struct Primary: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this host the primary of a resource (planned handover).",
        discussion: """
            Run it on the secondary that is to become primary. The current primary closes its export, writes \
            the rest of its log and seals it; this host fetches and replays up to the seal, then continues the \
            history at the next epoch and opens the export here. No acknowledged write is lost, and the old \
            primary goes on as a secondary of this host. The other secondaries follow the new primary by \
            themselves.

            Refused, and nothing changes, while the resource is in use on the current primary (its \
            /dev/mars/NAME mounted or open, or NBD clients connected: the message names them), while this \
            host is not a consistent, synced replica, while its fetch or replay is paused, while a member is \
            syncing (unless --ignore-sync: its sync starts again from the new primary), or during a split brain. \
            Returns once this host is primary; after --timeout seconds it fails and says what it waits for \
            (the request stays: 'marsadm secondary NAME' withdraws it).
            """
    )

    @Argument(help: "The resource name.")
    var name: String

    @Flag(help: "Hand over although a member is syncing (its sync starts again from this host).")
    var ignoreSync = false

    @Flag(help: "Attach /dev/mars/NAME on this host once it is primary.")
    var attach = false

    @OptionGroup var options: ControlOptions

    func run() throws {
        var options = options
        let wait = options.timeout
        options.timeout = wait + 30
        try options.perform(ControlRequest(command: .primary, name: name, timeout: wait, ignoreSync: ignoreSync, attach: attach))
    }
}

struct Secondary: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Withdraw this host's pending request to become primary of a resource.",
        discussion: """
            A 'marsadm primary' that timed out leaves its request standing, so the handover still happens when \
            the old primary seals. This withdraws it, unless the old primary has sealed already (then this host \
            finishes becoming primary: the history must go on somewhere).
            """
    )
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.secondary
}

struct PauseFetch: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop fetching a resource's log from its primary (the switch survives restarts).")
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.pauseFetch
}

struct ResumeFetch: ResourceCommand {
    static let configuration = CommandConfiguration(abstract: "Fetch a resource's log again, from the exact byte where it stopped.")
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.resumeFetch
}

struct PauseReplay: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop replaying a resource's log onto this host's device (a time-lagged or frozen replica).",
        discussion: "Returns once the batch in progress is applied and synced: the device is then a consistent copy (a prefix of the log) and may be copied. Fetch goes on."
    )
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.pauseReplay
}

struct ResumeReplay: ResourceCommand {
    static let configuration = CommandConfiguration(abstract: "Replay a resource's log onto this host's device again.")
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.resumeReplay
}

/// A command that names one resource and only asks marsd to do it.
protocol ResourceCommand: ParsableCommand {
    static var command: ControlRequest.Command { get }
    var name: String { get }
    var options: ControlOptions { get }
}

extension ResourceCommand {
    func run() throws {
        try options.perform(ControlRequest(command: Self.command, name: name))
    }
}

struct PauseSync: ResourceCommand {
    static let configuration = CommandConfiguration(abstract: "Pause a replica's initial sync where it is (the switch survives restarts).")
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.pauseSync
}

struct ResumeSync: ResourceCommand {
    static let configuration = CommandConfiguration(abstract: "Resume a replica's initial sync from the byte it reached.")
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.resumeSync
}

struct Invalidate: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Sync this host's replica of a resource again from its primary.",
        discussion: """
            For a replica marked NeedsSync (the primary let it go when it stayed away past the retention limit), \
            a damaged local log, or this host's side of a split brain. The local log is thrown away; the device \
            is compared chunk by chunk with the primary's and only what differs is copied. The replica is \
            Inconsistent until the sync and its replay are done.
            """
    )
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.invalidate
}

struct LeaveResource: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop being a secondary of a resource.",
        discussion: """
            Fetch, sync and replay stop and the local log goes; the data device stays as it is (the message \
            says whether it is a consistent copy). The primary stops keeping log for this host. With \
            --remove-lv, the logical volume made by --lvm goes too: refused before anything happens while it \
            is mounted or open elsewhere, and removed only when libdevmapper counts no opens.
            """
    )
    @Argument(help: "The resource name.") var name: String
    @Flag(help: "Remove the logical volume that create-resource or join-resource --lvm made.") var removeLv = false
    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .leaveResource, name: name, removeVolume: removeLv))
    }
}

struct DeleteResource: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a resource from the cluster, on its primary, once it is the last member.",
        discussion: "The log is written back first, so the data device holds every write; the device itself stays."
    )
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.deleteResource
}

struct LeaveCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove this host from its cluster.",
        discussion: "Refused while the host holds resources. The other members learn it by gossip."
    )
    @OptionGroup var options: ControlOptions
    func run() throws { try options.perform(ControlRequest(command: .leaveCluster)) }
}

struct Up: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Bring a resource up: recover its log and open its export.",
        discussion: "The resource stays up across marsd restarts until 'marsadm down'."
    )

    @Argument(help: "The resource name.")
    var name: String

    @OptionGroup var options: ControlOptions

    static let command = ControlRequest.Command.up
}

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a resource down: close its export and write its log back to the data device.",
        discussion: """
            An attached resource's /dev/mars/NAME is detached first; while it is in use (mounted, held by \
            a device stacked on it, open in a process) down is refused with the users named, unless \
            --force. Returns when the data device holds every acknowledged write. When it cannot (the data device \
            fails, or the log could not be written for 10 s and writes that were never flushed were given \
            up), the resource is down all the same, and marsadm says what the device lacks and exits with \
            status 1; view shows it until the resource is up again ('marsadm up' replays what the log \
            holds). The resource stays down across restarts until 'marsadm up'.
            """
    )

    @Argument(help: "The resource name.")
    var name: String

    @Flag(help: "Detach its local device even while it is in use (its users get I/O errors).")
    var force = false

    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .down, name: name, force: force))
    }
}

struct View: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the daemon, every resource with its log positions, and every export with its traffic."
    )

    @Argument(help: ArgumentHelp("Show only this resource.", valueName: "name"))
    var name: String?

    @OptionGroup var options: ControlOptions

    func run() throws {
        let response = try options.send(ControlRequest(command: .view))
        guard var status = response.status else { throw MarsadmError("marsd sent no status") }
        if let name {
            status.resources = status.resources.filter { $0.name == name }
            status.exports = status.exports.filter { $0.name == name }
            guard !status.resources.isEmpty else {
                if options.json { print((try? ControlCodec.prettyJSON(ControlResponse(error: "there is no resource '\(name)' on this host"))) ?? "") }
                throw MarsadmError("there is no resource '\(name)' on this host (marsadm view lists them)")
            }
        }
        if options.json {
            print(try ControlCodec.prettyJSON(status))
        } else {
            print(StatusTable.render(status))
        }
    }
}

/// A failure marsadm reports as one line (no usage text: the command line was fine).
struct MarsadmError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A data device is either given or made by --lvm.
func validateDeviceChoice(device: String?, lvm: String?) throws {
    switch (device, lvm) {
    case (nil, nil): throw ValidationError("give the data device, or --lvm VG to create it as a logical volume")
    case (.some, .some): throw ValidationError("give either the data device or --lvm, not both")
    default: break
    }
}

/// "1048576", "64M", "10G", "1T" (powers of 1024; an optional "iB" or "B" after the unit).
func parseSize(_ text: String, what: String = "--size") throws -> UInt64 {
    var digits = Substring(text)
    for suffix in ["iB", "B"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
        digits = digits.dropLast(suffix.count)
        break
    }
    let shifts: [Character: UInt64] = ["K": 10, "k": 10, "M": 20, "m": 20, "G": 30, "g": 30, "T": 40, "t": 40]
    var shift: UInt64 = 0
    if let unit = digits.last, let unitShift = shifts[unit] {
        shift = unitShift
        digits = digits.dropLast()
    }
    guard let value = UInt64(digits), value > 0, value <= UInt64.max >> shift else {
        throw ValidationError("\(what) \(text) is not a size: give bytes, or a number with K, M, G or T (for example 20G)")
    }
    return value << shift
}
