import Foundation
import SqueezeCluster
import SqueezeTraining

// What this executable decides for its process and no library does: signals (here), OpenMP's team
// size (`ComputeThreads.set` in each command) and CPU binding (`worker --cpus`).

/// SIGINT and SIGTERM become a stop request: they are taken on a thread of their own (`sigwait`),
/// so that no other thread is ever interrupted by them (no handler runs in the middle of an
/// allocation, no call fails with EINTR). Call before starting other threads; they inherit the
/// blocked mask. A second SIGINT exits at once.
func stopOnSignals() -> StopToken {
    let token = StopToken()
    var set = sigset_t()
    sigemptyset(&set)
    sigaddset(&set, SIGINT)
    sigaddset(&set, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &set, nil)
    let blocked = set
    let waiter = Thread {
        var signals = blocked
        while true {
            var sig: Int32 = 0
            guard sigwait(&signals, &sig) == 0 else { continue }
            if sig == SIGINT && token.isRequested { _exit(130) }
            token.request(signal: sig)
        }
    }
    waiter.name = "signals"
    waiter.start()
    return token
}

/// Routes SIGINT and SIGTERM of this (launcher) process to `handler` on a background queue.
final class SignalForwarder: @unchecked Sendable {
    // @unchecked Sendable: the sources are only touched at init.
    private var sources = [DispatchSourceSignal]()

    init(_ handler: @escaping @Sendable (Int32) -> Void) {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { handler(sig) }
            source.resume()
            sources.append(source)
        }
    }
}

/// Writes `ClusterEvent` lines on standard output when asked to (`--events`), else nothing.
func eventWriter(_ enabled: Bool) -> (ClusterEvent) -> Void {
    enabled ? { emit($0.line + "\n") } : { _ in }
}

/// Raises the soft limit on open descriptors to the hard limit (at most 65,536): every connection,
/// also one that never authenticates, holds a descriptor until its handshake times out, and a
/// process at its limit can accept no worker (and libzmq's listener spins on EMFILE).
func raiseDescriptorLimit() {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
    let target = min(limit.rlim_max, 65_536)
    if limit.rlim_cur < target {
        limit.rlim_cur = target
        _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    }
}
