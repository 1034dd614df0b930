import Foundation
import Testing
import SqueezeEngine
import SqueezeSystem
@testable import SqueezeCluster

/// `--trace FILE`: the timeline of real `train` and `launch` runs, read back.
@Suite("--trace timelines (real processes)", .serialized, .timeLimit(.minutes(10)))
struct TraceTests {
    /// The default model's layers (`train` and `launch` without model flags).
    static let layerNames = Network(config: ModelConfig()).layers.map(\.name)
    static let bucketCount = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 1 << 20).count

    /// The trace at `path`: standard JSON (read without our decoder first), then its events.
    func read(_ path: String) throws -> [TraceEvent] {
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any]
        #expect(json?["displayTimeUnit"] as? String == "ms")
        #expect((json?["traceEvents"] as? [Any])?.isEmpty == false)
        return try TraceFile.read(path)
    }

    /// Durations are not negative, and on every thread two events are disjoint or one holds the other.
    func checkNesting(_ events: [TraceEvent]) {
        let complete = events.filter { $0.ph == "X" }
        #expect(complete.allSatisfy { ($0.dur ?? -1) >= 0 && $0.ts != nil })
        for thread in Set(complete.map { [$0.pid, $0.tid] }) {
            let sorted = complete.filter { [$0.pid, $0.tid] == thread }.sorted { ($0.ts!, -$0.dur!) < ($1.ts!, -$1.dur!) }
            var open = [Int]()  // ends of the enclosing events
            for e in sorted {
                while let end = open.last, end <= e.ts! { open.removeLast() }
                if let end = open.last { #expect(e.ts! + e.dur! <= end, "\(e.name) at \(e.ts!) overlaps its enclosing event on \(thread)") }
                open.append(e.ts! + e.dur!)
            }
        }
    }

    func steps(_ events: [TraceEvent], pid: Int) -> Set<Int> {
        Set(events.filter { $0.pid == pid && $0.ph == "X" }.compactMap { if case .int(let s) = $0.args?["step"] { s } else { nil } })
    }

    /// Per-layer forward and backward, the optimizer step and a checkpoint on `pid`'s compute thread.
    func checkCompute(_ events: [TraceEvent], pid: Int, checkpoint: Bool, file: String) {
        let names = Set(events.filter { $0.pid == pid && $0.tid == TraceTrack.compute.rawValue }.map(\.name))
        for layer in Self.layerNames {
            #expect(names.contains("forward " + layer) && names.contains("backward " + layer), "\(file): rank \(pid) lacks \(layer)")
        }
        #expect(names.contains("optimizer step") && names.contains("wait for data"), "\(file): \(names.sorted())")
        #expect(names.contains { $0.hasPrefix("checkpoint") } == checkpoint, "\(file): \(names.sorted())")
        let metadata = events.filter { $0.pid == pid && $0.ph == "M" }.map(\.name)
        #expect(metadata.contains("process_name") && metadata.filter { $0 == "thread_name" }.count == 2)
    }

    @Test func trainRecordsTheLayersTheOptimizerAndCheckpointsOfTheWindowOnly() throws {
        let dir = try temporaryDirectory("trace-train")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let trace = dir + "/train.json"
        let train = try Child(["train", "--steps", "5", "--batch-size", "16", "--no-eval", "--trace", trace, "--trace-steps", "2",
                               "--checkpoint-dir", dir + "/ckpt", "--checkpoint-every", "1"], log: dir + "/train.log")
        #expect(train.wait() == 0, "\(train.output)")
        #expect(train.output.contains("timeline written to \(trace)"), "\(train.output)")
        let events = try read(trace)
        checkCompute(events, pid: 0, checkpoint: true, file: trace)
        #expect(steps(events, pid: 0) == [1, 2])  // the two steps after the first
        #expect(events.filter { $0.name.hasPrefix("step ") }.count == 2)
        #expect(!events.contains { $0.tid == TraceTrack.allReduce.rawValue && $0.ph == "X" })  // one process: no all-reduce
        checkNesting(events)
    }

    @Test(arguments: ["ring", "star"])
    func launchMergesEveryRanksTrackWithEachBucketsAllReduce(algorithm: String) throws {
        let dir = try temporaryDirectory("trace-launch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let trace = dir + "/cluster.json"
        let launch = try Child(["launch", "--workers", "2", "--steps", "4", "--batch-size", "16", "--no-eval", "--allreduce", algorithm,
                                "--trace", trace, "--trace-steps", "2:4", "--checkpoint-dir", dir + "/ckpt", "--checkpoint-every", "1"],
                               log: dir + "/launch.log")
        #expect(launch.wait() == 0, "\(launch.output)")
        let events = try read(trace)
        let hub = algorithm == "star" ? [2] : []
        #expect(Set(events.map(\.pid)) == Set([0, 1] + hub))
        for rank in [0, 1] {
            checkCompute(events, pid: rank, checkpoint: true, file: trace)  // rank 1's is short: its residual, if any
            #expect(steps(events, pid: rank) == [2, 3])
        }
        for pid in [0, 1] + hub {
            let buckets = events.filter { $0.pid == pid && $0.tid == TraceTrack.allReduce.rawValue && $0.cat == "allreduce" }
            let seen = Set(buckets.compactMap { e -> [Int]? in
                guard case .int(let s) = e.args?["step"], case .int(let b) = e.args?["bucket"] else { return nil }
                return [s, b]
            })
            #expect(seen == Set([2, 3].flatMap { s in (0..<Self.bucketCount).map { [s, $0] } }), "pid \(pid): \(seen)")
            let parts = Set(events.filter { $0.pid == pid && $0.tid == TraceTrack.allReduce.rawValue }.compactMap(\.cat))
            // A star worker only sends and receives; the hub and ring ranks reduce.
            let reduces = algorithm == "ring" || pid == 2
            #expect(parts.isSuperset(of: ["send", "receive"]) && parts.contains("reduce") == reduces, "pid \(pid): \(parts)")
        }
        checkNesting(events)
        // The processes' parts are gone.
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.contains(".parts-") }.isEmpty)
    }

    @Test func badTraceFlagsAreRefusedBeforeTraining() throws {
        let dir = try temporaryDirectory("trace-flags")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cases: [([String], String)] = [
            (["train", "--trace", dir + "/t.json", "--trace-steps", "0"], "--trace-steps must be N"),
            (["train", "--trace", dir + "/t.json", "--trace-steps", "5:2"], "--trace-steps must be N"),
            (["train", "--trace", dir + "/t.json", "--trace-steps", "1:2000"], "at most 1000 steps"),
            (["train", "--trace-steps", "3"], "--trace-steps needs --trace"),
            (["train", "--trace", dir + "/missing/t.json"], "does not exist"),
            (["train", "--trace", dir], "is a directory"),
            (["launch", "--trace", dir + "/missing/t.json"], "does not exist"),
            (["worker", "--coordinator", "tcp://127.0.0.1:1", "--trace", dir + "/missing/t.json"], "does not exist"),
            (["coordinator", "--bind", "tcp://127.0.0.1:*", "--workers", "2", "--trace", dir + "/hub.json"], "--allreduce ring"),
            (["join", "--trace-steps", "x:y"], "--trace-steps needs --trace"),
        ]
        for (i, (arguments, message)) in cases.enumerated() {
            let c = try Child(arguments + ["--steps", "1"].filter { _ in arguments[0] != "worker" }, log: dir + "/\(i).log")
            #expect(c.wait() != 0, "\(arguments)")
            #expect(c.output.contains(message) && !c.output.contains("training squeezenet"), "\(arguments): \(c.output)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/t.json"))
    }
}
