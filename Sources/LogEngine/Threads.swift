import CLinux

#if canImport(Glibc)
import Glibc
#endif

/// State behind a pthread mutex, with condition variables the engine's threads sleep on.
/// (Synchronization.Mutex has no condition variables; the log writer and writeback threads block.)
final class Monitor<State>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var state: State

    init(_ state: State) {
        self.state = state
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<T>(_ body: (inout State) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state)
    }

    /// Waits on `condition` until `ready` holds (checked under the lock), then runs `body` still
    /// holding it. With `timeout`, `body` also runs when the time is up.
    func wait<T>(
        _ condition: Condition, timeout: Duration? = nil, until ready: (inout State) -> Bool, then body: (inout State) -> T
    ) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if let timeout {
            var deadline = timespec()
            clock_gettime(CLOCK_REALTIME, &deadline)
            let (seconds, attoseconds) = timeout.components
            let nanoseconds = Int(deadline.tv_nsec) + Int(attoseconds / 1_000_000_000)
            deadline.tv_sec += Int(seconds) + nanoseconds / 1_000_000_000
            deadline.tv_nsec = nanoseconds % 1_000_000_000
            while !ready(&state) {
                if pthread_cond_timedwait(condition.pointer, mutex, &deadline) == ETIMEDOUT { break }
            }
        } else {
            while !ready(&state) { pthread_cond_wait(condition.pointer, mutex) }
        }
        return body(&state)
    }
}

final class Condition: @unchecked Sendable {
    let pointer = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() { pthread_cond_init(pointer, nil) }

    deinit {
        pthread_cond_destroy(pointer)
        pointer.deallocate()
    }

    func signal() { pthread_cond_signal(pointer) }
    func broadcast() { pthread_cond_broadcast(pointer) }
}

/// A dedicated thread for blocking work (the log writer, writeback), joined on stop.
final class WorkerThread: @unchecked Sendable {
    private var thread = pthread_t()

    init(name: String, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body: body, name: name)).toOpaque()
        let result = pthread_create(&thread, nil, { argument in
            let box = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue()
            clinux_set_thread_name(box.name)
            box.body()
            return nil
        }, box)
        precondition(result == 0, "cannot start thread \(name): errno \(result)")
    }

    func join() {
        pthread_join(thread, nil)
    }

    private final class Box {
        let body: @Sendable () -> Void
        let name: String
        init(body: @escaping @Sendable () -> Void, name: String) {
            self.body = body
            self.name = name
        }
    }
}
