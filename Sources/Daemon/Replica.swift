import BlockStore
import LogEngine
import Logging
import NIOCore
import NIOPosix
import PeerProtocol
import Replication
import Synchronization
import TransactionLog

/// A resource on a secondary: its local log (fetched segments, replayed in order onto the data
/// device), the fetch from the primary, and the initial sync while it runs.
final class Replica: Sendable {
    let name: String
    let device: BlockDevice
    let log: ReplicaLog
    let fetcher: ReplicaFetcher
    private let sync = Mutex<SyncClient?>(nil)
    private let syncTask = Mutex<Task<Void, Never>?>(nil)
    /// The copy is done (and `endLSN` known): replay may run.
    let synced = Atomic<Bool>(false)
    /// When this host first heard (by gossip) that the primary's durable end had passed which LSN:
    /// the lag in seconds of data not even fetched yet. Local times: no clock skew. At most 64.
    private let primarySamples = Mutex<[(lsn: UInt64, heard: UInt64)]>([])

    func observePrimary(durable: UInt64, now: UInt64) {
        primarySamples.withLock { samples in
            guard durable > (samples.last?.lsn ?? 0) else { return }
            samples.append((durable, now))
            if samples.count > 64 { samples.removeFirst() }
        }
    }

    /// Seconds since the primary was first heard to have durable data beyond `replayed`.
    func secondsBehind(replayed: UInt64, now: UInt64) -> Double {
        primarySamples.withLock { samples in
            samples.removeAll { $0.lsn <= replayed }
            return samples.first.map { Double(now > $0.heard ? now - $0.heard : 0) / 1000 } ?? 0
        }
    }

    init(name: String, device: BlockDevice, log: ReplicaLog, fetcher: ReplicaFetcher) {
        self.name = name
        self.device = device
        self.log = log
        self.fetcher = fetcher
    }

    var syncClient: SyncClient? { sync.withLock { $0 } }

    func setSync(_ client: SyncClient?) { sync.withLock { $0 = client } }

    /// Runs `body` as this replica's sync task (the initial sync, or a resize's tail copy) unless
    /// one runs already: one copy onto the device at a time.
    func startSyncTask(_ body: @escaping @Sendable () async -> Void) {
        syncTask.withLock { task in
            guard task == nil else { return }
            task = Task { [self] in
                await body()
                // Done (or cancelled): the next copy may start. stopSync took it out already when it cancelled it.
                if !Task.isCancelled { syncTask.withLock { $0 = nil } }
            }
        }
    }

    var isSyncing: Bool { syncTask.withLock { $0 != nil } }

    /// Stops the sync where it is (its offset is persisted) and waits for it.
    func stopSync() async {
        let task = syncTask.withLock { task -> Task<Void, Never>? in
            defer { task = nil }
            return task
        }
        task?.cancel()
        await task?.value
    }

    /// Stops fetch, sync and replay (after its batch): the device is then a prefix of the log.
    func stop() async {
        try? await fetcher.stop().get()
        await stopSync()
        log.shutdown()
    }
}
