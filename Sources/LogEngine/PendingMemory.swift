import Synchronization

/// Something that waits for pending memory another holder gives back.
protocol PendingMemoryWaiter: AnyObject, Sendable {
    /// Called once per wait, on the thread that gave memory back, with no lock held.
    func pendingMemoryFreed()
}

/// The memory the pending changes of every log engine of one host draw from: payloads of logged
/// writes not yet on their data devices, and a fixed overhead per change (invariant 7: a host's
/// memory does not grow with the number of resources being written; one budget per resource did).
///
/// A holder that holds nothing may always take one change, so a change larger than the capacity, or
/// one that meets a budget the others filled, cannot wait forever: the memory held is at most the
/// capacity plus one change per resource being written.
public final class PendingMemory: Sendable {
    public let capacity: Int
    private struct State {
        var held = 0
        var waiters: [ObjectIdentifier: any PendingMemoryWaiter] = [:]
    }
    private let state = Mutex(State())

    public init(capacity: Int) {
        self.capacity = capacity
    }

    /// Bytes held by every holder together.
    public var heldBytes: Int { state.withLock { $0.held } }

    /// Whether `bytes` more fit now.
    func hasRoom(for bytes: Int) -> Bool {
        state.withLock { $0.held + bytes <= capacity }
    }

    /// Takes `bytes`, whether or not they fit (the caller asked `hasRoom` or holds nothing).
    func take(_ bytes: Int) {
        state.withLock { $0.held += bytes }
    }

    /// Gives `bytes` back; returns the waiters to call once the caller's locks are released.
    func giveBack(_ bytes: Int) -> [any PendingMemoryWaiter] {
        state.withLock { state in
            state.held -= bytes
            guard !state.waiters.isEmpty, state.held < capacity else { return [] }
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
    }

    /// Asks for one `pendingMemoryFreed()` at the next give-back that leaves room.
    func wait(_ waiter: any PendingMemoryWaiter) {
        state.withLock { $0.waiters[ObjectIdentifier(waiter)] = waiter }
    }
}
