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

/// Ignores SIGINT and SIGTERM: a worker's stop is the coordinator's to decide (under `launch` it
/// gets them too), and rank 0 checkpoints where it says.
func ignoreStopSignals() {
    signal(SIGINT, SIG_IGN)
    signal(SIGTERM, SIG_IGN)
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
