import BlockStore
import Crypto
import Logging
import LogEngine
import NIOCore
import NIOPosix
import PeerProtocol
import TransactionLog

/// What the peer port serves, provided by the daemon.
public protocol PeerRequestHandler: Sendable {
    /// The log of `resource` when this host is its primary, nil otherwise.
    func primaryLog(of resource: String) -> LogEngine?
    /// The log another member may fetch `resource` from here: the primary's, or this secondary's.
    func fetchSource(of resource: String) -> (any ShippingSource)?
    /// The size of `resource` as this host stores it.
    func size(of resource: String) -> UInt64?
    /// The primary's data device of `resource` (its holes need no reading).
    func dataDevice(of resource: String) -> BlockDevice?
    /// Merges a peer's gossip and returns this host's (both JSON, see Cluster).
    func gossip(_ entries: [UInt8], from peer: PeerIdentity) -> [UInt8]
    /// `peer` has durably fetched `resource`'s log up to `lsn`.
    func fetched(_ resource: String, by peer: PeerIdentity, upTo lsn: UInt64)
    /// `peer` starts an initial sync of `resource` (a join, or a repair after NeedsSync); its
    /// retention hold is set: persist it.
    func syncStarting(_ resource: String, by peer: PeerIdentity)
    /// `peer` asked for `resource`'s log with a history at `epoch`, newer than this host's, and was
    /// answered `staleSource`. A primary learns from it that it was deposed (and fences itself,
    /// docs/handover.md §4.2).
    func staleSourceSeen(_ resource: String, epoch: UInt64, by peer: PeerIdentity)
}

/// Serves one authenticated peer link: gossip, log fetches and initial sync requests.
public final class PeerSession: @unchecked Sendable {
    private let link: PeerLink
    private let handler: any PeerRequestHandler
    /// Where the reading and hashing of sync compares runs, off the event loop.
    private let pool: NIOThreadPool
    private let logger: Logger
    private var streams: [String: FetchStream] = [:]
    private var lastMessage = NIODeadline.now()
    private var closed = false

    /// A peer silent this long is gone (its fetcher pings every 2 s): the link is closed, so a
    /// partition does not keep streams and sockets forever.
    static let silenceLimit: TimeAmount = .seconds(30)

    /// Attaches to `link`; call on its event loop (the listener's accept callback is).
    public static func serve(_ link: PeerLink, handler: any PeerRequestHandler, pool: NIOThreadPool, logger: Logger) {
        let session = PeerSession(link: link, handler: handler, pool: pool, logger: logger)
        link.onMessage = { message in session.received(message) }
        link.onClose = { session.linkClosed() }
        link.onWritable = { for stream in session.streams.values { stream.pump() } }
        session.watchSilence()
    }

    private init(link: PeerLink, handler: any PeerRequestHandler, pool: NIOThreadPool, logger: Logger) {
        self.link = link
        self.handler = handler
        self.pool = pool
        self.logger = logger
    }

    private func watchSilence() {
        link.eventLoop.scheduleTask(in: .seconds(5)) { [self] in
            guard !closed else { return }
            if NIODeadline.now() - lastMessage > Self.silenceLimit {
                logger.notice("peer \(link.address) (\(link.remote.host)): silent for over \(Self.silenceLimit.nanoseconds / 1_000_000_000) s; closing the link")
                link.close()
                return
            }
            watchSilence()
        }
    }

    private func received(_ message: PeerMessage) {
        lastMessage = .now()
        switch message {
        case .gossip(let entries):
            link.send(.gossip(entries: handler.gossip(entries, from: link.remote)))
        case .ping(let value):
            link.send(.pong(value))
        case .fetch(let request):
            startFetch(request)
        case .fetchAck(let ack):
            guard let stream = streams[ack.resource] else { return }
            if let lsn = stream.acknowledged(ack) { handler.fetched(ack.resource, by: link.remote, upTo: lsn) }
        case .syncBegin(let resource):
            guard let log = handler.primaryLog(of: resource), let size = handler.size(of: resource) else {
                link.send(.fetchError(FetchError(resource: resource, code: .notPrimary, reason: "\(link.remote.host) asked for a sync, but this host is not the primary of \(resource)")))
                return
            }
            let start = log.beginSyncHold(for: link.remote.host)
            // Stored before the answer: a primary restarted right after must still hold it.
            handler.syncStarting(resource, by: link.remote)
            link.send(.syncPosition(SyncPosition(
                resource: resource, size: size, lsn: start.lsn, segment: start.segment.fileName, segmentFirstLSN: start.segmentFirstLSN,
                epoch: start.epoch
            )))
        case .logPosition(let resource):
            guard let log = handler.primaryLog(of: resource), let size = handler.size(of: resource) else {
                link.send(.fetchError(FetchError(resource: resource, code: .notPrimary, reason: "this host is not the primary of \(resource)")))
                return
            }
            let snapshot = log.shippingSnapshot()
            let current = snapshot.segments.last!
            link.send(.syncPosition(SyncPosition(
                resource: resource, size: size, lsn: snapshot.durableLSN, segment: current.name.fileName, segmentFirstLSN: current.firstLSN,
                epoch: snapshot.epoch
            )))
        case .syncCompare(let request):
            compare(request)
        default:
            logger.warning("peer \(link.address) (\(link.remote.host)): unexpected message \(message.name); closing the link")
            link.close()
        }
    }

    private func linkClosed() {
        closed = true
        for stream in streams.values { stream.stop() }
        streams = [:]
    }

    private func startFetch(_ request: FetchRequest) {
        streams[request.resource]?.stop()
        guard let log = handler.fetchSource(of: request.resource) else {
            link.send(.fetchError(FetchError(resource: request.resource, code: .noSuchResource, reason: "this host has no log of \(request.resource) to fetch from")))
            return
        }
        guard let segment = SegmentName(fileName: request.segment) else {
            link.send(.fetchError(FetchError(resource: request.resource, code: .internalError, reason: "'\(request.segment)' is no segment name")))
            return
        }
        let ownEpoch = log.shippingSnapshot().epoch
        guard request.epoch <= ownEpoch else {
            let reason = "this host's history of \(request.resource) is at epoch \(ownEpoch), \(link.remote.host)'s at epoch \(request.epoch): "
                + "a newer epoch's history is not served from here"
            logger.notice("fetch of \(request.resource) by \(link.remote.host): \(reason)")
            link.send(.fetchError(FetchError(resource: request.resource, code: .staleSource, reason: reason)))
            handler.staleSourceSeen(request.resource, epoch: request.epoch, by: link.remote)
            return
        }
        let window = min(max(request.window, FetchStream.minimumWindow), 256 << 20)
        let stream = FetchStream(link: link, log: log, resource: request.resource, segment: segment, offset: request.offset, window: window, logger: logger)
        streams[request.resource] = stream
        stream.pump()
    }

    /// Compares the primary's device with the replica's chunk digests and sends what differs. The
    /// device is read as it is (not the pending changes): the replica replays the log from the
    /// sync's start over the copy. The reading and hashing run on the pool; the answer goes out
    /// in one piece, its `syncCompared` last.
    private func compare(_ request: SyncCompare) {
        guard let log = handler.primaryLog(of: request.resource), let device = handler.dataDevice(of: request.resource) else {
            link.send(.fetchError(FetchError(resource: request.resource, code: .notPrimary, reason: "this host is not the primary of \(request.resource)")))
            return
        }
        // The device's capacity, not the resource's size: during a resize the members copy the new
        // tail before the size is raised.
        let size = device.size
        guard request.offset <= size else {
            link.send(.fetchError(FetchError(resource: request.resource, code: .internalError, reason: "offset \(request.offset) is beyond the device's \(size) bytes")))
            return
        }
        guard request.chunkSize > 0, request.chunkSize <= SyncComparison.maxChunkSize else {
            link.send(.fetchError(FetchError(resource: request.resource, code: .internalError, reason: "chunk size \(request.chunkSize) is not between 1 byte and 1 MiB")))
            return
        }
        let comparison = SyncComparison(request: request, size: size, device: device, allocator: link.allocator) {
            buffer, offset throws(SystemError) in try log.readDataDevice(into: buffer, at: offset)
        }
        let link = link
        pool.runIfActive(eventLoop: link.eventLoop) { try comparison.differences() }.whenComplete { result in
            switch result {
            case .success(let messages):
                for message in messages { link.send(message) }
                link.send(.syncCompared(SyncCompared(resource: request.resource, offset: request.offset, count: UInt32(request.digests.count))))
            case .failure(let error):
                link.send(.fetchError(FetchError(resource: request.resource, code: .internalError, reason: "\(error)")))
            }
        }
    }
}

/// One resource's log streamed to one peer: the bytes of its segments from where the peer asked,
/// up to the durable end, following the tail as it grows, never more than `window` bytes beyond
/// what the peer acknowledged (its own durability).
final class FetchStream {
    private let link: PeerLink
    private let log: any ShippingSource
    private let resource: String
    private let logger: Logger
    private var segment: SegmentName
    private var segmentFirstLSN: UInt64?
    private var file: (any StorageFile)?
    private var sent: UInt64
    private var acknowledged: UInt64
    /// Segments the stream has moved past whose bytes the peer has not all acknowledged yet, oldest
    /// first. They count towards the window too: without them each segment end opened a whole new
    /// window while the last one's bytes were still in flight.
    private var earlier: [(segment: String, firstLSN: UInt64, end: UInt64, acknowledged: UInt64)] = []
    private let window: UInt64
    private var stopped = false
    private var scheduled = false

    /// Bytes of one segmentData message.
    static let chunk: UInt64 = 1 << 20
    /// The least window served, whatever a peer asks for: a receiver acknowledges whole records
    /// only, so a window smaller than the largest record would never open again.
    static let minimumWindow = UInt64(LogRecordLayout.recordSize(payload: LogRecordLayout.maxPayload)) + chunk
    /// How often a stream at the durable end looks for more.
    static let tailPoll: TimeAmount = .milliseconds(5)

    init(link: PeerLink, log: any ShippingSource, resource: String, segment: SegmentName, offset: UInt64, window: UInt64, logger: Logger) {
        self.link = link
        self.log = log
        self.resource = resource
        self.segment = segment
        self.sent = offset
        self.acknowledged = offset
        self.window = window
        self.logger = logger
    }

    func stop() { stopped = true }

    /// Bytes sent that the peer has not acknowledged.
    private var inFlight: UInt64 {
        earlier.reduce(sent - acknowledged) { $0 + $1.end - $1.acknowledged }
    }

    /// Takes an acknowledgement; returns the LSN the peer now holds.
    func acknowledged(_ ack: FetchAck) -> UInt64? {
        // A peer cannot acknowledge what it was not sent (it would open the window beyond it), and
        // acknowledges in log order: a later segment's acknowledgement covers the earlier ones.
        let held: (firstLSN: UInt64?, offset: UInt64)
        if ack.segment == segment.fileName {
            earlier.removeAll()
            acknowledged = min(max(acknowledged, ack.offset), sent)
            held = (segmentFirstLSN, acknowledged)
        } else if let index = earlier.firstIndex(where: { $0.segment == ack.segment }) {
            earlier.removeFirst(index)
            earlier[0].acknowledged = min(max(earlier[0].acknowledged, ack.offset), earlier[0].end)
            held = (earlier[0].firstLSN, earlier[0].acknowledged)
        } else {
            return nil
        }
        pump()
        guard let first = held.firstLSN, held.offset >= UInt64(SegmentHeader.size) else { return nil }
        return first + held.offset - UInt64(SegmentHeader.size)
    }

    func pump() {
        guard !stopped else { return }
        while true {
            let snapshot = log.shippingSnapshot()
            guard let index = snapshot.segments.firstIndex(where: { $0.name == segment }) else {
                if let (code, reason) = Self.missing(segment, in: snapshot, primary: log is LogEngine, asker: link.remote.host) {
                    fail(code, reason)
                } else {
                    later()
                }
                return
            }
            segmentFirstLSN = snapshot.segments[index].firstLSN
            let end = snapshot.shippableEnd(of: index)
            if sent > end {
                // A primary ships durable bytes only, so a peer beyond them has another history; a
                // secondary serving others may just be behind that peer: it waits to catch up.
                if log is LogEngine {
                    fail(.forked, "\(link.remote.host) asked for \(segment) from byte \(sent), but it ends at byte \(end) here")
                } else {
                    later()
                }
                return
            }
            while sent < end, inFlight < window, link.isWritable {
                let count = min(Self.chunk, end - sent, window - inFlight)
                let bytes: ByteBuffer
                do {
                    if file == nil { file = try log.logDirectory.open(segment.fileName, create: false) }
                    let file = file!
                    bytes = try ByteBuffer.reading(count: Int(count), allocator: link.allocator) { buffer throws(SystemError) in
                        try file.read(into: buffer, at: sent)
                    }
                } catch {
                    fail(.internalError, "cannot read \(segment) at byte \(sent): \(error)")
                    return
                }
                guard UInt64(bytes.readableBytes) == count else {
                    fail(.internalError, "\(segment) ended at byte \(sent + UInt64(bytes.readableBytes)), before \(end)")
                    return
                }
                link.send(.segmentData(SegmentData(resource: resource, segment: segment.fileName, offset: sent, bytes: bytes)))
                sent += count
            }
            guard sent == end, index + 1 < snapshot.segments.count else {
                // At the durable end: follow the tail. (A full window waits for the next
                // acknowledgement, a full socket for `onWritable`.)
                if sent == end { later() }
                return
            }
            let next = snapshot.segments[index + 1].name
            link.send(.segmentEnd(SegmentEnd(resource: resource, segment: segment.fileName, size: end, next: next.fileName)))
            if acknowledged < end, let first = segmentFirstLSN {
                earlier.append((segment.fileName, first, end, acknowledged))
            }
            segment = next
            segmentFirstLSN = snapshot.segments[index + 1].firstLSN
            file = nil
            sent = 0
            acknowledged = 0
        }
    }

    /// The answer to a fetch of `segment`, which `snapshot` does not hold; nil while it may still
    /// come (its sequence is beyond the newest here).
    static func missing(
        _ segment: SegmentName, in snapshot: ShippingSnapshot, primary: Bool, asker: String
    ) -> (FetchErrorCode, String)? {
        guard let oldest = snapshot.segments.first, let newest = snapshot.segments.last, segment.sequence <= newest.name.sequence else {
            return nil
        }
        if segment.sequence < oldest.name.sequence {
            return (.segmentGone, "\(segment) is no longer in this host's log (the oldest is \(oldest.name))")
        }
        // This host's history went past that place with segments of its own: the asker's history
        // forks from it. A secondary serving others may itself be the one that forked: the asker
        // then asks another member (the primary).
        let reason: String
        if let other = snapshot.segments.first(where: { $0.name.sequence == segment.sequence }) {
            reason = "\(asker) asked for \(segment), but this host's log has \(other.name) there"
        } else {
            let before = snapshot.segments.last { $0.name.sequence < segment.sequence }!.name
            let after = snapshot.segments.first { $0.name.sequence > segment.sequence }!.name
            reason = "\(asker) asked for \(segment), but this host's log goes from \(before) on to \(after)"
        }
        return (primary ? .forked : .segmentGone, reason)
    }

    private func later() {
        guard !scheduled, !stopped else { return }
        scheduled = true
        link.eventLoop.scheduleTask(in: Self.tailPoll) { [self] in
            scheduled = false
            pump()
        }
    }

    private func fail(_ code: FetchErrorCode, _ reason: String) {
        logger.warning("fetch of \(resource) by \(link.remote.host): \(reason)")
        link.send(.fetchError(FetchError(resource: resource, code: code, reason: reason)))
        stopped = true
    }
}
