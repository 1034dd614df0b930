import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeSystem
import SqueezeTraining

/// `--trace FILE` and `--trace-steps`, shared by `train`, `launch`, `coordinator`, `worker`, `join` and `bench train`.
struct TraceOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Write a timeline here: Chrome trace-event JSON (open it in https://ui.perfetto.dev or chrome://tracing), one track per rank.",
        discussion: "Off by default, at no cost. See docs/cluster.md (\"Timeline\") for what each command records."))
    var trace: String?
    @Option(help: "Steps the timeline records: N (the N steps after this run's first step, a warm-up) or A:B (steps A to B-1 as the metrics number them); at most 1000 steps. Default: 5.")
    var traceSteps: String?

    /// `--trace-steps` (checked by `validate()`), else the default.
    var window: TraceWindow { traceSteps.flatMap { try? TraceWindow(parsing: $0) } ?? Self.defaultWindow }
    static let defaultWindow = try! TraceWindow(parsing: "5")  // a literal

    func validate() throws {
        guard let trace else {
            if traceSteps != nil { throw ValidationError("--trace-steps needs --trace FILE") }
            return
        }
        if let traceSteps {
            do { _ = try TraceWindow(parsing: traceSteps) } catch { throw ValidationError("\(error)") }
        }
        do { try TraceFile.checkWritable(trace) } catch { throw ValidationError("\(error)") }
    }

    /// A tracer writing to `--trace` (nil without it).
    func tracer(pid: Int, processName: String) -> Tracer? {
        trace.map { Tracer(path: $0, pid: pid, processName: processName, window: window) }
    }
}

extension TraceOptions {
    /// The coordinator's timeline is the star hub's: refused with a ring, where no gradient passes it.
    func requireStarHub(_ algorithm: AllReduceAlgorithm) throws {
        guard trace != nil, algorithm != .star else { return }
        throw ValidationError("--trace on the coordinator records the star hub, and with --allreduce \(algorithm.rawValue) no gradient "
            + "passes the coordinator: give --trace to the workers (or to launch, which merges theirs)")
    }

    /// `--trace FILE` for rank `rank` of a `join` run: FILE with `.rank-R` before its extension (every
    /// process runs the same command line, perhaps on a shared filesystem); `rank` nil: the star hub's (`.hub`).
    func joinPath(rank: Int?) -> String? {
        trace.map { path in
            let tag = rank.map { ".rank-\($0)" } ?? ".hub"
            let ext = (path as NSString).pathExtension
            return ext.isEmpty ? path + tag : (path as NSString).deletingPathExtension + tag + "." + ext
        }
    }
}
