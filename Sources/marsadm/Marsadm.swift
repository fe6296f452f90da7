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
            CreateCluster.self, CreateResource.self, Up.self, Down.self, View.self, LogDump.self, LogVerify.self,
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
}

struct CreateCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make this host the first member of a new cluster.",
        discussion: "Writes the cluster identity under marsd's root. Run it once, on the first host."
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
            carries the resource's name, and every change to it is logged under ROOT/resource-NAME.
            """
    )

    @Argument(help: ArgumentHelp("The resource name: \(SafeName.rule)."))
    var name: String

    @Argument(help: "The data device: a regular file or a block device.")
    var device: String

    @OptionGroup var options: ControlOptions

    func run() throws {
        // marsd runs elsewhere: a relative path means the caller's directory, so send it absolute.
        var path = device
        if !path.hasPrefix("/") {
            guard let directory = getcwd(nil, 0) else { throw MarsadmError("cannot resolve \(device): getcwd failed") }
            defer { free(directory) }
            path = String(cString: directory) + "/" + path
        }
        try options.perform(ControlRequest(command: .createResource, name: name, device: path))
    }
}

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Bring a resource up: recover its log and open its export.",
        discussion: "The resource stays up across marsd restarts until 'marsadm down'."
    )

    @Argument(help: "The resource name.")
    var name: String

    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .up, name: name))
    }
}

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a resource down: close its export and write its log back to the data device.",
        discussion: """
            Returns when the data device holds every acknowledged write. When it cannot (the data device \
            fails, or the log could not be written for 10 s and writes that were never flushed were given \
            up), the resource is down all the same, and marsadm says what the device lacks and exits with \
            status 1; view shows it until the resource is up again ('marsadm up' replays what the log \
            holds). The resource stays down across restarts until 'marsadm up'.
            """
    )

    @Argument(help: "The resource name.")
    var name: String

    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .down, name: name))
    }
}

struct View: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the daemon, every resource with its log positions, and every export with its traffic."
    )

    @OptionGroup var options: ControlOptions

    func run() throws {
        let response = try options.send(ControlRequest(command: .view))
        guard let status = response.status else { throw MarsadmError("marsd sent no status") }
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
