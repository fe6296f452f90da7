import ArgumentParser
import ControlProtocol

@main
struct Marsadm: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "marsadm",
        abstract: "Operate swift-mars: inspect and control the local marsd.",
        discussion: """
            marsadm talks to the marsd on this host over its control socket. Every command has \
            machine-readable output with --json.
            """,
        version: marsVersion,
        subcommands: [View.self]
    )
}

struct ControlOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The control socket of the local marsd (marsd --control).", valueName: "path"))
    var control = "/run/marsd/control.sock"

    @Flag(help: "Print JSON instead of a table.")
    var json = false
}

struct View: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the daemon and every export with its connections and traffic."
    )

    @OptionGroup var options: ControlOptions

    func run() throws {
        let response: ControlResponse
        do {
            response = try ControlClient.send(ControlRequest(command: .view), to: options.control)
        } catch {
            throw ValidationError("\(error)")
        }
        if let error = response.error { throw ValidationError("marsd refused: \(error)") }
        guard let status = response.status else { throw ValidationError("marsd sent no status") }
        if options.json {
            print(try ControlCodec.prettyJSON(status))
        } else {
            print(StatusTable.render(status))
        }
    }
}
