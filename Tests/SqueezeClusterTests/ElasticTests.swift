import Foundation
import Testing
@testable import SqueezeCluster

/// `launch --elastic` with real processes (issue 29): a worker SIGKILLed or SIGSTOPped mid-run is
/// removed, the others are renumbered and go on from the last completed step in memory.
@Suite("launch --elastic (real processes)", .serialized, .timeLimit(.minutes(10)))
struct ElasticTests {
    /// 30 steps of 24 images (8 per worker with 3, 12 with 2); no dropout, whose masks depend on the rank.
    static let common = ["--steps", "30", "--batch-size", "24", "--dropout", "0", "--no-eval", "--lr", "0.01"]

    /// Starts `launch --workers 3` with `arguments` and metrics in `dir`, waits until the coordinator
    /// has written step `step`'s lines, then sends `signal` to worker 1. Returns launch and that worker's pid.
    func launchAndSignal(_ signal: Int32, atStep step: Int, _ arguments: [String], in dir: String) throws -> (Child, pid_t) {
        let launch = try Child(["launch", "--workers", "3", "--metrics", dir + "/m.jsonl"] + arguments, log: dir + "/launch.log")
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline && launch.process.isRunning {
            if let lines = try? readMetrics(dir + "/m.jsonl"), lines.contains(where: { ($0["step"] as? Int ?? -1) >= step }) { break }
            usleep(50_000)
        }
        guard let worker = childProcess(of: launch.process.processIdentifier, containing: " --rank 1 ") else {
            throw TestFailure("worker 1 of launch is not running:\n\(launch.output)")
        }
        kill(worker, signal)
        return (launch, worker)
    }

    @Test(arguments: ["ring", "tree"])
    func aKilledWorkerIsRemovedAndTheSurvivorsGoOnFromTheLastCompletedStep(allreduce: String) throws {
        let dir = try temporaryDirectory("elastic-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = Self.common + ["--allreduce", allreduce]
        let (launch, _) = try launchAndSignal(SIGKILL, atStep: 6, ["--elastic", "--save-weights", dir + "/elastic.safetensors"] + common, in: dir)
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        #expect(launch.output.contains("the run goes on without it"), "\(launch.output)")
        let all = try readAllMetrics(dir + "/m.jsonl")
        let changes = all.filter { $0["event"] as? String == "membership" }
        try #require(changes.count == 1, "\(launch.output)")
        let from = try #require(changes[0]["from_step"] as? Int)
        #expect(changes[0]["world_size"] as? Int == 2)
        #expect(changes[0]["lost_ranks"] as? [Int] == [1])
        #expect((changes[0]["lost"] as? String)?.contains("dropped its connection") == true, "\(changes[0])")  // not --timeout's silence
        // Each step once per rank of its members: 3 before the change, 2 from it (the step before may lack the lost rank's line).
        for step in 0..<30 {
            let lines = all.filter { $0["rank"] != nil && $0["step"] as? Int == step }
            let world = step < from ? 3 : 2
            #expect(lines.allSatisfy { $0["world_size"] as? Int == world }, "step \(step)")
            #expect(lines.count == world || (step == from - 1 && lines.count == 2), "step \(step): \(lines.count) lines")
        }
        #expect(launch.output.contains("membership: epoch 0: 3 worker(s) from step 0; epoch 1: 2 worker(s) from step \(from)"), "\(launch.output)")

        // The reference: 3 workers to step `from` (its checkpoint), then 2 resumed from it. The same global
        // batches and ring sums, so bit for bit the same weights, if the survivors went on from step `from`'s state.
        let first = try Child(["launch", "--workers", "3", "--checkpoint-dir", dir + "/ckpt", "--checkpoint-every", "\(from)", "--keep-checkpoints", "100"]
                              + common, log: dir + "/first.log")
        #expect(first.wait(timeout: 300) == 0, "\(first.output)")
        let keep = String(format: "checkpoint-%09d.safetensors", from)
        for name in try FileManager.default.contentsOfDirectory(atPath: dir + "/ckpt") where name.hasPrefix("checkpoint-") && name != keep {
            try FileManager.default.removeItem(atPath: dir + "/ckpt/" + name)
        }
        let second = try Child(["launch", "--workers", "2", "--checkpoint-dir", dir + "/ckpt", "--resume", "--save-weights", dir + "/reference.safetensors"]
                               + common, log: dir + "/second.log")
        #expect(second.wait(timeout: 300) == 0, "\(second.output)")
        #expect(second.output.contains("at step \(from)"), "\(second.output)")
        let difference = try byteDifference(dir + "/elastic.safetensors", dir + "/reference.safetensors")
        #expect(difference == nil, "\(difference ?? "")")
    }

    @Test func belowMinWorkersTheFurthestSurvivorCheckpointsAndTheRunStopsNamingTheLostRank() throws {
        let dir = try temporaryDirectory("elastic-min")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (launch, _) = try launchAndSignal(SIGKILL, atStep: 4, ["--elastic", "--min-workers", "3", "--checkpoint-dir", dir + "/ckpt"] + Self.common,
                                              in: dir)
        #expect(launch.wait(timeout: 300) != 0, "\(launch.output)")
        #expect(launch.output.contains("2 worker(s) remain, below --min-workers 3; lost: rank 1 (member #1, dropped its connection"), "\(launch.output)")
        let written = try FileManager.default.contentsOfDirectory(atPath: dir + "/ckpt").filter { $0.hasPrefix("checkpoint-") }
        #expect(written.count == 1, "\(written)")
        #expect(launch.output.contains("below --min-workers 3") && launch.output.contains("): \(dir)/ckpt/checkpoint-"), "\(launch.output)")
    }

    @Test func aHungWorkerIsRemovedAfterTheTimeout() throws {
        let dir = try temporaryDirectory("elastic-hang")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (launch, worker) = try launchAndSignal(SIGSTOP, atStep: 4, ["--elastic", "--timeout", "2"] + Self.common, in: dir)
        let removed = launch.waitForOutput("membership epoch 1: 2 worker(s)", timeout: 120)
        kill(worker, SIGKILL)  // stopped, it would hold the launcher for its grace period at the end
        #expect(removed, "\(launch.output)")
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        let changes = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "membership" }
        #expect(changes.count == 1)
        #expect((changes.first?["lost"] as? String)?.contains("stopped answering") == true, "\(changes)")
        #expect(try readMetrics(dir + "/m.jsonl").filter { $0["step"] as? Int == 29 }.count == 2)
    }
}

/// The pid of a child of `parent` whose command line contains `text`, from /proc.
func childProcess(of parent: pid_t, containing text: String) -> pid_t? {
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
        guard let pid = pid_t(entry), let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { continue }
        let fields = stat[stat.index(after: close)...].split(separator: " ")  // state, ppid, …
        guard fields.count > 1, pid_t(fields[1]) == parent, let raw = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
        if String(decoding: raw.map { $0 == 0 ? 32 : $0 }, as: UTF8.self).contains(text) { return pid }
    }
    return nil
}
