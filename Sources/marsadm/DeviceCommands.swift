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

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Grow a resource online (on its primary), or shrink it with --force.",
        discussion: """
            Growing: the primary's data device must hold SIZE bytes; a logical volume made with --lvm is \
            grown to it (lvextend), any other device must be grown beforehand. The wanted size then goes to \
            every member through the cluster metadata: each grows its own logical volume (--lvm) and copies \
            the new tail from the primary, which no client can write yet. Once every member is ready, the \
            primary raises the resource's size: clients that connect from then on see it, connected ones may \
            use it, and /dev/mars/NAME gets it at once (netlink reconfigure), so a mounted filesystem grows \
            online with resize2fs or xfs_growfs. No downtime, no full sync. Until then 'marsadm view NAME' on \
            the primary shows which member it waits for and why; resizing to the current size cancels it. \
            Shrinking is refused unless --force: then clients see the smaller size at once (shrink the \
            filesystem first); the data devices keep their size.
            """
    )
    @Argument(help: "The resource name.") var name: String
    @Argument(help: ArgumentHelp("The new size: bytes, or with K, M, G, T (powers of 1024).", valueName: "size")) var size: String
    @Flag(help: "Shrink the resource (whatever lies beyond the new size is cut off for its users).") var force = false
    @OptionGroup var options: ControlOptions

    func validate() throws {
        _ = try parseSize(size, what: "SIZE")
    }

    func run() throws {
        try options.perform(ControlRequest(command: .resize, name: name, force: force, size: try parseSize(size, what: "SIZE")))
    }
}
