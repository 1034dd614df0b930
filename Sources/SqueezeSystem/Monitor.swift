// A mutex + condition variable (pthreads), with waits bounded by a deadline.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Mutual exclusion plus one condition variable. Waits use deadlines on `ContinuousClock`.
public final class Monitor: @unchecked Sendable {
    // @unchecked Sendable: the pthread objects are heap-allocated (stable addresses),
    // initialised once and only used through pthread calls, which are thread-safe.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        #if os(Linux)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
        #else
        pthread_cond_init(cond, nil)
        #endif
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    @inline(__always)
    public func withLock<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Wakes every waiter. Call with the lock held.
    public func broadcast() { pthread_cond_broadcast(cond) }

    /// Waits (lock held) until signalled or `deadline` passes (nil: no deadline).
    /// Returns false if the deadline had passed. Spurious wake-ups return true:
    /// callers re-check their condition in a loop.
    public func wait(until deadline: ContinuousClock.Instant?) -> Bool {
        guard let deadline else {
            pthread_cond_wait(cond, mutex)
            return true
        }
        let remaining = deadline - ContinuousClock.now
        if remaining <= .zero { return false }
        let (s, atto) = remaining.components
        #if os(Linux)
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        var sec = Int64(ts.tv_sec) + s
        var nsec = Int64(ts.tv_nsec) + atto / 1_000_000_000
        if nsec >= 1_000_000_000 { sec += 1; nsec -= 1_000_000_000 }
        var abs = timespec(tv_sec: Int(sec), tv_nsec: Int(nsec))
        let rc = pthread_cond_timedwait(cond, mutex, &abs)
        #else
        var rel = timespec(tv_sec: Int(s), tv_nsec: Int(atto / 1_000_000_000))
        let rc = pthread_cond_timedwait_relative_np(cond, mutex, &rel)
        #endif
        return rc != ETIMEDOUT
    }
}
