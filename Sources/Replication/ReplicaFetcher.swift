import Logging
import LogEngine
import NIOCore
import NIOPosix
import PeerProtocol
import Synchronization
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// How a replica's fetch stands, for `marsadm view`.
public struct FetchState: Sendable, Equatable {
    public enum Link: String, Sendable {
        case connecting, connected, paused, unreachable, stopped
    }
    public var link: Link = .connecting
    public var primary: String?
    /// The host the log comes from now: the primary, or another member that has the bytes.
    public var source: String?
    /// The last problem, with the peer's address.
    public var problem: String?
    /// The primary no longer has the segment this replica needs: only a sync brings it back.
    public var needsSync = false
    /// The primary says this replica's log goes beyond its own: another history (split brain).
    public var forked = false
    /// The local log is at its space limit: fetch waits for replay to free segments.
    public var logFull = false
    public var bytesFetched: UInt64 = 0
    /// Wall-clock ms of the last message from the primary.
    public var lastContact: UInt64?
}

/// Pulls a resource's log from its primary into the local `ReplicaLog`: one authenticated link,
/// a fetch from the exact byte where the local log ends, bytes checked and appended in order off
/// the event loop, acknowledged once durable (the primary keeps a window in flight, so a long fat
/// link stays full). Reconnects with backoff forever and resumes at the exact byte.
public final class ReplicaFetcher: @unchecked Sendable {
    /// Where the log can come from: the designated primary first, then other members that may have it.
    public typealias SourceLookup = @Sendable () -> [FetchSource]

    private let resource: String
    private let log: ReplicaLog
    private let sources: SourceLookup
    /// Which of `sources` the next connection asks. Event-loop confined.
    private var choice = FetchSourceChoice()
    private let loop: any EventLoop
    private let group: any EventLoopGroup
    private let pool: NIOThreadPool
    private let credentials: @Sendable () -> PeerCredentials?
    private let logger: Logger
    /// Where a replica without any segment starts (its sync's position).
    private let firstSegment: SegmentName?
    private let state = Mutex(FetchState())
    /// Event-loop confined.
    private var link: PeerLink?
    private var work: EventLoopFuture<Void>
    private var queued = 0
    private var uncommitted: UInt64 = 0
    private var backoff: TimeAmount = .milliseconds(200)
    private var running = false
    private var generation = 0

    /// Bytes the primary may send beyond the last acknowledgement: fills 3.3 Gbit/s at 100 ms RTT,
    /// holds the largest record (32 MiB) with room to spare (acknowledgements cover whole records
    /// only), and bounds what waits in this host's memory to be appended (the RSS budget is 256 MiB).
    static let window: UInt64 = 40 << 20
    static let commitBytes: UInt64 = 8 << 20

    public init(
        resource: String, log: ReplicaLog, firstSegment: SegmentName?, sources: @escaping SourceLookup, group: any EventLoopGroup,
        pool: NIOThreadPool, credentials: @escaping @Sendable () -> PeerCredentials?, logger: Logger
    ) {
        self.resource = resource
        self.log = log
        self.firstSegment = firstSegment
        self.sources = sources
        self.group = group
        self.loop = group.next()
        self.pool = pool
        self.credentials = credentials
        self.logger = logger
        self.work = loop.makeSucceededVoidFuture()
    }

    public var status: FetchState { state.withLock { $0 } }

    public func start() {
        loop.execute { [self] in
            guard !running else { return }
            running = true
            // What sources answered before a pause may have changed meanwhile.
            choice = FetchSourceChoice()
            state.withLock { $0.link = .connecting }
            connect()
        }
    }

    /// The designated primary changed (a handover or failover): the link to another host is
    /// dropped and the new primary asked from this log's exact end. The history goes on there, so
    /// nothing is fetched twice and no sync is needed.
    public func sourcesChanged() {
        loop.execute { [self] in
            choice.designationChanged()
            guard running else { return }
            let primary = sources().first?.host
            state.withLock { $0.primary = primary }
            if let link, link.remote.host == primary { return }
            backoff = .milliseconds(200)
            abandon(generation, "the designated primary of \(resource) is now \(primary ?? "nobody")")
        }
    }

    /// Stops fetching (pause-fetch, down): closes the link; what arrived stays.
    public func stop(_ why: FetchState.Link = .stopped) -> EventLoopFuture<Void> {
        loop.flatSubmit { [self] in
            running = false
            generation += 1
            link?.close()
            link = nil
            state.withLock { $0.link = why }
            return work
        }
    }

    private func connect() {
        guard running else { return }
        let attempt = generation
        let candidates = sources()
        guard let credentials = credentials(), !candidates.isEmpty else {
            retry(attempt, "no primary is known for \(resource) yet")
            return
        }
        guard let source = choice.choose(from: candidates) else {
            retry(attempt, "every member that could serve \(resource) holds an older epoch's history than this host; asking them again")
            return
        }
        state.withLock { state in
            state.primary = candidates[0].host
            state.source = source.host
        }
        PeerLink.connect(to: source.address, group: loop, credentials: credentials, logger: logger).hop(to: loop).whenComplete { [self] result in
            guard attempt == generation, running else {
                if case .success(let link) = result { link.close() }
                return
            }
            switch result {
            case .failure(let error):
                state.withLock { $0.link = .unreachable }
                moveOn(from: source.host, attempt, "\(source.host): \(error)")
            case .success(let link):
                established(link, attempt: attempt)
            }
        }
    }

    /// A link that says nothing this long is dead (a partition drops packets without closing
    /// anything): it is abandoned and a new one tried. Pings keep an idle link talking.
    static let silenceLimit: TimeAmount = .seconds(10)
    static let pingInterval: TimeAmount = .seconds(2)

    /// How long a link to another member (not the primary) is kept before the primary is tried
    /// again: members fetching from each other must never keep each other from the primary.
    static let detourLimit: TimeAmount = .seconds(10)

    private func heartbeat(_ link: PeerLink, attempt: Int, since: NIODeadline = .now()) {
        loop.scheduleTask(in: Self.pingInterval) { [self] in
            guard attempt == generation, running, self.link === link else { return }
            if let primary = sources().first?.host, link.remote.host != primary, !choice.stale.contains(primary),
                NIODeadline.now() - since > Self.detourLimit
            {
                choice.restartAtPrimary()
                abandon(attempt, "trying the primary again after \(Self.detourLimit.nanoseconds / 1_000_000_000) s from \(link.remote.host)")
                return
            }
            let silent = state.withLock { state in state.lastContact.map { wallClockMilliseconds() - $0 } ?? 0 }
            if silent > UInt64(Self.silenceLimit.nanoseconds / 1_000_000) {
                moveOn(from: link.remote.host, attempt, "no message from \(link.remote.host) for \(silent / 1000) s")
                return
            }
            link.send(.ping(wallClockMilliseconds()))
            heartbeat(link, attempt: attempt, since: since)
        }
    }

    private func established(_ link: PeerLink, attempt: Int) {
        self.link = link
        state.withLock { $0.lastContact = wallClockMilliseconds() }
        heartbeat(link, attempt: attempt)
        link.onMessage = { [self] message in received(message, attempt: attempt) }
        link.onClose = { [self] in
            guard attempt == generation else { return }
            self.link = nil
            state.withLock { $0.link = .unreachable }
            retry(attempt, "the link to \(link.remote.host) closed")
        }
        // Ask once the work queued from an earlier link is done: the local log's end is then exact.
        work.whenComplete { [self] _ in
            guard attempt == generation else { return }
            let position = log.fetchPosition
            let segment = position?.segment ?? firstSegment
            guard let segment else {
                logger.error("fetch of \(resource): the local log has no segment and no sync position")
                return
            }
            backoff = .milliseconds(200)
            state.withLock { state in
                state.link = .connected
                state.problem = nil
            }
            // The replayed epoch: the history's epoch at the fetched end is at least that, so a
            // source is never told of an epoch this host does not hold.
            let epoch = log.status.epoch
            link.send(.fetch(FetchRequest(
                resource: resource, segment: segment.fileName, offset: position?.offset ?? 0, window: Self.window, epoch: epoch
            )))
        }
    }

    private func received(_ message: PeerMessage, attempt: Int) {
        guard attempt == generation else { return }
        state.withLock { $0.lastContact = wallClockMilliseconds() }
        switch message {
        case .segmentData(let data) where data.resource == resource:
            guard let name = SegmentName(fileName: data.segment) else { return abandon(attempt, "'\(data.segment)' is no segment name") }
            let count = UInt64(data.bytes.readableBytes)
            enqueue(attempt) { [log] in try log.receive(segment: name, offset: data.offset, bytes: Array(data.bytes.readableBytesView)) }
            uncommitted += count
            state.withLock { $0.bytesFetched += count }
            choice.progressed()
        case .segmentEnd(let end) where end.resource == resource:
            guard let name = SegmentName(fileName: end.segment) else { return abandon(attempt, "'\(end.segment)' is no segment name") }
            enqueue(attempt) { [log] in try log.segmentEnded(name, size: end.size) }
        case .fetchError(let error) where error.resource == resource:
            let host = link?.remote.host ?? "the source"
            switch error.errorCode {
            case .forked:
                logger.error("fetch of \(resource) stopped: \(error.reason)")
                state.withLock { state in
                    state.forked = true
                    state.problem = "split brain: \(error.reason)"
                }
                running = false
                generation += 1
                link?.close()
            case .segmentGone:
                // Another member (during a handover the old primary) may still have what this
                // one removed: a sync only when none has it.
                if choice.segmentGone(from: host, among: sources()) {
                    needsSync("\(host): \(error.reason)")
                } else {
                    abandon(attempt, "\(host) no longer has it (\(error.reason)); asking another member")
                }
            case .staleSource:
                if choice.staleSource(host, among: sources()) {
                    needsSync("\(host): \(error.reason)")
                } else {
                    abandon(attempt, "\(host) is no source for this host's history: \(error.reason)")
                }
            default:
                abandon(attempt, "\(host) said: \(error.reason)")
            }
        case .pong:
            break
        default:
            abandon(attempt, "unexpected message \(message.name)")
        }
    }

    /// Runs `body` off the event loop after everything queued before it; when the queue drains (or
    /// enough arrived), commits and acknowledges.
    private func enqueue(_ attempt: Int, _ body: @escaping @Sendable () throws -> Void) {
        queued += 1
        work = work.flatMap { [pool, loop] in pool.runIfActive(eventLoop: loop, body) }.hop(to: loop).flatMapError { [self] error in
            failed(attempt, error)
            return loop.makeSucceededVoidFuture()
        }.map { [self] in
            queued -= 1
            if queued == 0 || uncommitted >= Self.commitBytes { commitAndAcknowledge(attempt) }
        }
    }

    private func commitAndAcknowledge(_ attempt: Int) {
        uncommitted = 0
        work = work.flatMap { [pool, loop, log] in
            pool.runIfActive(eventLoop: loop) { try log.commit() }
        }.hop(to: loop).map { [self] position in
            guard let position else { return }
            acknowledge(position, attempt: attempt)
        }.flatMapError { [self] error in
            failed(attempt, error)
            return loop.makeSucceededVoidFuture()
        }
    }

    /// Acknowledges `position` once the local log has room: until then the primary's window stays
    /// closed and nothing more arrives.
    private func acknowledge(_ position: FetchPosition, attempt: Int) {
        guard attempt == generation, let link else { return }
        guard log.hasRoom else {
            state.withLock { $0.logFull = true }
            loop.scheduleTask(in: .milliseconds(200)) { [self] in acknowledge(position, attempt: attempt) }
            return
        }
        state.withLock { $0.logFull = false }
        link.send(.fetchAck(FetchAck(resource: resource, segment: position.segment.fileName, offset: position.offset)))
    }

    private func failed(_ attempt: Int, _ error: any Error) {
        guard attempt == generation else { return }
        if let error = error as? ReplicaLogError, error.kind == .fork || error.kind == .corrupt {
            // Never retried: the operator decides (split brain, or a damaged stream).
            logger.error("fetch of \(resource) stopped: \(error)")
            state.withLock { $0.problem = "\(error)" }
            running = false
            generation += 1
            link?.close()
            return
        }
        abandon(attempt, "\(error)")
    }

    /// The link to `host` failed: the next source is tried, unless that leaves none that may have
    /// the bytes this log needs.
    private func moveOn(from host: String, _ attempt: Int, _ reason: String) {
        if choice.failed(host, among: sources()) {
            needsSync(reason)
        } else {
            abandon(attempt, reason)
        }
    }

    /// No member has the log this replica needs any more: it stops for the operator (`invalidate`).
    private func needsSync(_ lastAnswer: String) {
        let asked = choice.lacking.union(choice.stale).sorted().joined(separator: ", ")
        let reason = "no member has the log this replica needs any more (asked \(asked)); the last answer: \(lastAnswer). "
            + "'marsadm invalidate \(resource)' syncs it again"
        logger.error("fetch of \(resource) stopped: \(reason)")
        state.withLock { state in
            state.needsSync = true
            state.problem = reason
        }
        running = false
        link?.close()
    }

    /// Drops the link and starts again from the local log's exact end.
    private func abandon(_ attempt: Int, _ reason: String) {
        guard attempt == generation else { return }
        generation += 1
        link?.close()
        link = nil
        retry(generation, reason)
    }

    private func retry(_ attempt: Int, _ reason: String) {
        guard running, attempt == generation else { return }
        state.withLock { $0.problem = reason }
        logger.notice("fetch of \(resource): \(reason); retrying in \(backoff.nanoseconds / 1_000_000) ms")
        let delay = backoff
        backoff = min(backoff * 2, .seconds(5))
        generation += 1
        // A later abandon (a source change) or stop supersedes this attempt.
        let scheduled = generation
        loop.scheduleTask(in: delay) { [self] in
            guard scheduled == generation else { return }
            connect()
        }
    }
}

/// Milliseconds since 1970, the clock gossip and lag figures use.
public func wallClockMilliseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(now.tv_sec) * 1000 + UInt64(now.tv_nsec) / 1_000_000
}
