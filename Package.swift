// swift-tools-version: 6.2
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "swift-mars",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "marsd", targets: ["marsd"]),
        .executable(name: "marsadm", targets: ["marsadm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
    ],
    targets: [
        // liburing behind an opaque header: <liburing.h> redefines _GNU_SOURCE and clashes with Swift's Glibc module.
        .target(name: "CIOURing", linkerSettings: [.linkedLibrary("uring")]),
        // Linux constants and calls the Glibc module hides (_GNU_SOURCE, variadic ioctl, statx DIO alignment).
        .target(name: "CLinux"),
        // The kernel's NBD client over generic netlink (no libnl): connect, reconfigure, disconnect, status.
        .target(name: "CNBDKernel"),
        // Local block devices of resources: the kernel's NBD client on marsd's own socket, /dev/mars links, who holds a device.
        .target(
            name: "LocalDevice",
            dependencies: ["CNBDKernel", "BlockStore", "NBDProtocol"],
            swiftSettings: swiftSettings
        ),
        // liblvm2cmd behind an opaque header (lvm2_run in this process, its error messages collected).
        .target(name: "CLVM", linkerSettings: [.linkedLibrary("lvm2cmd")]),
        // libdevmapper behind an opaque header (a dm device's open count).
        .target(name: "CDeviceMapper", linkerSettings: [.linkedLibrary("devmapper")]),
        // Logical volumes of resources: create, open count, remove.
        .target(name: "LogicalVolumes", dependencies: ["CLVM", "CDeviceMapper", "BlockStore"], swiftSettings: swiftSettings),
        // CRC32C with the SSE4.2 instruction where available (a C target: per-function target attributes).
        .target(name: "CChecksum"),
        // The transaction log's on-disk format: records, segments, scanning. Pure: no I/O policy, no NIO.
        .target(name: "TransactionLog", dependencies: ["CChecksum"], swiftSettings: swiftSettings),
        // The log engine: pending writes, group commit, writeback, recovery (growing with issue 3).
        .target(name: "LogEngine", dependencies: ["TransactionLog", "BlockStore", "CLinux"], swiftSettings: swiftSettings),
        // Data devices and the I/O engines (io_uring, thread-pool pread/pwrite). No NIO: storage threads never need a loop.
        .target(
            name: "BlockStore",
            dependencies: ["CIOURing", "CLinux"],
            swiftSettings: swiftSettings
        ),
        // The NBD wire protocol as pure values: codecs, handshake state machine, request validation.
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        // NIO glue: listeners, per-connection handler, per-event-loop I/O queues.
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol", "BlockStore", "LogEngine",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // The peer wire protocol as pure values: frames, messages, the authenticated handshake, join tokens.
        .target(
            name: "PeerProtocol",
            dependencies: [.product(name: "Crypto", package: "swift-crypto"), .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        // Cluster metadata as pure values: gossiped keys with owners and logical clocks, merged newest-wins.
        .target(name: "Cluster", swiftSettings: swiftSettings),
        // Log shipping and replay: the primary's log server, the secondary's receiver, replayer and sync.
        .target(
            name: "Replication",
            dependencies: [
                "PeerProtocol", "Cluster", "LogEngine", "TransactionLog", "BlockStore",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // Requests and replies of the marsd control socket (JSON lines), shared by marsd and marsadm.
        .target(name: "ControlProtocol", swiftSettings: swiftSettings),
        // The daemon: services, control socket, configuration.
        .target(
            name: "Daemon",
            dependencies: [
                "NBDServer", "NBDProtocol", "BlockStore", "ControlProtocol", "LogEngine", "TransactionLog",
                "PeerProtocol", "Cluster", "Replication", "LocalDevice", "LogicalVolumes",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "marsd",
            dependencies: [
                "Daemon", "BlockStore", "NBDServer", "ControlProtocol", "Replication", "LocalDevice",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "marsadm",
            dependencies: [
                "ControlProtocol", "LogEngine", "BlockStore", "TransactionLog",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        // Helpers shared by the test targets.
        .target(name: "TestSupport", dependencies: ["BlockStore"], path: "Tests/TestSupport", swiftSettings: swiftSettings),
        .testTarget(name: "LogEngineTests", dependencies: ["LogEngine", "TransactionLog", "BlockStore", "TestSupport"], swiftSettings: swiftSettings),
        .testTarget(
            name: "TransactionLogTests", dependencies: ["TransactionLog", "TestSupport"], swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "PeerProtocolTests",
            dependencies: ["PeerProtocol", "TestSupport", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        .testTarget(name: "ClusterTests", dependencies: ["Cluster", "TestSupport"], swiftSettings: swiftSettings),
        .testTarget(
            name: "ReplicationTests",
            dependencies: ["Replication", "PeerProtocol", "Cluster", "LogEngine", "TransactionLog", "BlockStore", "TestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "LocalDeviceTests",
            dependencies: ["LocalDevice", "NBDServer", "NBDProtocol", "BlockStore", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"), .product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "BlockStoreTests",
            dependencies: ["BlockStore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: ["NBDProtocol", "TestSupport", .product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer", "NBDProtocol", "BlockStore", "LogEngine", "Daemon", "ControlProtocol", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
