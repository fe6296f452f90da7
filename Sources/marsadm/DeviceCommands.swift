import ArgumentParser
import ControlProtocol

struct Attach: ResourceCommand {
    static let configuration = CommandConfiguration(
        abstract: "Give a resource a local block device on its primary: /dev/mars/NAME.",
        discussion: """
            marsd does the NBD handshake on its own Unix socket (marsd --unix is needed) and hands the \
            connection to the kernel's NBD client over netlink (module nbd), no nbd-client process needed. \
            /dev/mars/NAME links to the /dev/nbdN the kernel chose; mount it, or give it to an LXC container. \
            The device survives restarts of marsd: when marsd dies, its requests wait (up to 600 s) and the \
            restarted marsd reconnects it, so a mounted filesystem goes on.
            """
    )
    @Argument(help: "The resource name.") var name: String
    @OptionGroup var options: ControlOptions
    static let command = ControlRequest.Command.attach
}

struct Detach: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a resource's local block device (/dev/mars/NAME).",
        discussion: """
            Refused while the device is in use: mounted, a device-mapper or md device stacked on it, or open \
            in a process; the refusal names each user. --force detaches it all the same: whatever uses it \
            gets I/O errors from then on.
            """
    )
    @Argument(help: "The resource name.") var name: String
    @Flag(help: "Detach even while the device is in use.") var force = false
    @OptionGroup var options: ControlOptions

    func run() throws {
        try options.perform(ControlRequest(command: .detach, name: name, force: force))
    }
}
