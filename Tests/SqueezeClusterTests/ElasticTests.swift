import Foundation
import Testing
import SqueezeTransport
@testable import SqueezeCluster

/// `launch --elastic` with real processes (issue 29): a worker SIGKILLed or SIGSTOPped mid-run is
/// removed, the others are renumbered and go on from the last completed step in memory; a worker
/// started while the run trains joins it.
@Suite("launch --elastic (real processes)", .serialized, .timeLimit(.minutes(10)))
struct ElasticTests {
    /// `steps` steps of 24 images (8 per worker with 3, 12 with 2); no dropout, whose masks depend on the rank.
    static func training(steps: Int) -> [String] { ["--steps", "\(steps)", "--batch-size", "24", "--dropout", "0", "--no-eval", "--lr", "0.01"] }
    static let common = training(steps: 30)
    /// Long enough for a new process to load the data and join before the run ends.
    static let long = training(steps: 150)

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

    /// Worker 1 SIGKILLs itself in step 6 (`SQUEEZETRAIN_FAULT`): as the step begins (forward), once
    /// backward has finished the first gradient bucket, or once the first bucket's all-reduce has
    /// completed (the others still to go); ring, tree and star. The survivors cannot complete step 6
    /// without it, so they go on from step 6's state. With BatchNorm, whose running statistics the
    /// weights file holds too: the abandoned step had run its forward pass, which updates them.
    @Test(arguments: [("ring", "forward"), ("ring", "backward"), ("ring", "allreduce"), ("tree", "backward"), ("tree", "allreduce"),
                      ("star", "forward"), ("star", "allreduce")])
    func aKilledWorkerIsRemovedAndTheSurvivorsGoOnFromTheLastCompletedStep(allreduce: String, phase: String) throws {
        let dir = try temporaryDirectory("elastic-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = Self.common + ["--allreduce", allreduce, "--batch-norm"]
        let launch = try Child(["launch", "--workers", "3", "--metrics", dir + "/m.jsonl", "--elastic", "--save-weights", dir + "/elastic.safetensors"] + common,
                               log: dir + "/launch.log", environment: [InjectedFault.variable: "kill:1:6:\(phase)"])
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        #expect(launch.output.contains("rank 1: SQUEEZETRAIN_FAULT: this worker kills itself in step 6's \(phase)"), "\(launch.output)")
        #expect(launch.output.contains("worker 1 (pid ") && launch.output.contains("was killed by signal 9 (SIGKILL); the run goes on without it"), "\(launch.output)")
        let all = try readAllMetrics(dir + "/m.jsonl")
        let changes = all.filter { $0["event"] as? String == "membership" }
        try #require(changes.count == 1, "\(launch.output)")
        let from = try #require(changes[0]["from_step"] as? Int)
        #expect(from == 6, "\(changes[0])")
        #expect(changes[0]["world_size"] as? Int == 2)
        #expect(changes[0]["lost_ranks"] as? [Int] == [1])
        #expect((changes[0]["lost"] as? String)?.contains("dropped its connection") == true, "\(changes[0])")  // not --timeout's silence
        expectWorldSizes(all, steps: 30, epochs: [(0, 3), (from, 2)])
        #expect(launch.output.contains("membership: epoch 0: 3 worker(s) from step 0; epoch 1: 2 worker(s) from step \(from)"), "\(launch.output)")

        // The reference: 3 workers to step `from`, then 2. The same global batches and ring sums, so bit
        // for bit the same weights, if the survivors went on from step `from`'s state.
        try reference([(3, from), (2, nil)], common, in: dir)
        let difference = try byteDifference(dir + "/elastic.safetensors", dir + "/reference.safetensors")
        #expect(difference == nil, "\(difference ?? "")")
    }

    /// Writes `dir`/reference.safetensors: the weights of a run of `common` trained by `segments[i].workers`
    /// workers up to step `segments[i].until` (nil: the end), each segment resumed from the checkpoint of
    /// the one before at its last step.
    func reference(_ segments: [(workers: Int, until: Int?)], _ common: [String], in dir: String) throws {
        var from = 0
        for (i, segment) in segments.enumerated() {
            var arguments = ["launch", "--workers", "\(segment.workers)", "--checkpoint-dir", dir + "/ckpt", "--keep-checkpoints", "1000"] + common
            if i > 0 { arguments.append("--resume") }
            // Every `until` steps: a checkpoint at step `until`, and the later ones removed below.
            arguments += segment.until.map { ["--checkpoint-every", "\($0)"] } ?? ["--save-weights", dir + "/reference.safetensors"]
            let run = try Child(arguments, log: dir + "/reference-\(i).log")
            #expect(run.wait(timeout: 300) == 0, "\(run.output)")
            if i > 0 { #expect(run.output.contains("at step \(from)"), "\(run.output)") }
            guard let until = segment.until else { return }
            let keep = String(format: "checkpoint-%09d.safetensors", until)
            for name in try FileManager.default.contentsOfDirectory(atPath: dir + "/ckpt") where name.hasPrefix("checkpoint-") && name != keep {
                try FileManager.default.removeItem(atPath: dir + "/ckpt/" + name)
            }
            from = until
        }
    }

    /// Every step's lines carry the world size of the membership epoch that trained it, one per rank
    /// (the step before a change may lack a rank's line: it had abandoned that step when it was halted),
    /// and the images the workers report for a step add up to the global batch of 24: no step is
    /// skipped or trained twice, and each is divided over its members whole.
    func expectWorldSizes(_ all: [[String: Any]], steps: Int, epochs: [(fromStep: Int, worldSize: Int)]) {
        for step in 0..<steps {
            let lines = all.filter { $0["rank"] != nil && $0["step"] as? Int == step }
            let world = epochs.last { $0.fromStep <= step }!.worldSize
            #expect(lines.allSatisfy { $0["world_size"] as? Int == world }, "step \(step)")
            let beforeChange = epochs.contains { $0.fromStep == step + 1 }
            #expect(lines.count == world || (beforeChange && (1..<world).contains(lines.count)), "step \(step): \(lines.count) lines")
            #expect(Set(lines.compactMap { $0["rank"] as? Int }).count == lines.count, "step \(step): a rank reported it twice")
            if lines.count == world { #expect(lines.reduce(0) { $0 + ($1["images"] as? Int ?? 0) } == 24, "step \(step)") }
        }
    }

    /// Grow: a worker killed, launch's replacement joins at a step boundary and receives the state from
    /// a member. The final weights are those of 3, then 2, then 3 workers resumed from checkpoints at
    /// the same steps: they differ if the joiner's state differed from the members' by a single bit.
    /// A star's workers reach only the hub: the state goes round a ring of the workers beside it.
    @Test(arguments: ["ring", "star"])
    func aReplacementWorkerJoinsTheRunningRunWithTheMembersStateBitForBit(allreduce: String) throws {
        let dir = try temporaryDirectory("elastic-grow")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let long = Self.long + ["--allreduce", allreduce]
        let (launch, _) = try launchAndSignal(SIGKILL, atStep: 6, ["--elastic", "--replace-workers", "1", "--save-weights", dir + "/elastic.safetensors"]
                                              + long, in: dir)
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        #expect(launch.output.contains("started joiner 1 (pid "), "\(launch.output)")
        let all = try readAllMetrics(dir + "/m.jsonl")
        let changes = all.filter { $0["event"] as? String == "membership" }
        try #require(changes.count == 2, "\(launch.output)")
        #expect(changes.map { $0["world_size"] as? Int } == [2, 3])
        #expect(changes[0]["lost_ranks"] as? [Int] == [1] && changes[0]["joined_ranks"] == nil)
        #expect(changes[1]["lost_ranks"] as? [Int] == [] && changes[1]["joined_ranks"] as? [Int] == [2], "\(changes[1])")
        let lost = try #require(changes[0]["from_step"] as? Int), joined = try #require(changes[1]["from_step"] as? Int)
        expectWorldSizes(all, steps: 150, epochs: [(0, 3), (lost, 2), (joined, 3)])
        #expect(launch.output.contains("[joiner 1] rank 2: received the training state of step \(joined)"), "\(launch.output)")
        #expect(launch.output.contains("epoch 1: 2 worker(s) from step \(lost); epoch 2: 3 worker(s) from step \(joined)"), "\(launch.output)")

        try reference([(3, lost), (2, joined), (3, nil)], long, in: dir)
        let difference = try byteDifference(dir + "/elastic.safetensors", dir + "/reference.safetensors")
        #expect(difference == nil, "\(difference ?? "")")
    }

    /// Grow from the command line: `squeezetrain worker --coordinator …` joins a run it was not part of;
    /// a worker with another key cannot connect at all, and one beyond --max-workers is refused, naming it.
    @Test func aWorkerStartedWhileTheRunTrainsJoinsItAndStrangersAreRefused() throws {
        let dir = try temporaryDirectory("elastic-join")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "2", "--elastic", "--max-workers", "3", "--metrics", dir + "/m.jsonl"] + Self.long,
                                                           in: dir)
        let members = try (0..<2).map { try Child(["worker", "--coordinator", endpoint], log: dir + "/member-\($0).log") }
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline && coordinator.process.isRunning && (try? readMetrics(dir + "/m.jsonl"))?.contains(where: { $0["step"] as? Int == 3 }) != true {
            usleep(50_000)
        }
        let other = dir + "/other.key"
        try RunKey.generate().write(to: other)
        let stranger = try Child(["worker", "--coordinator", endpoint, "--key-file", other, "--join-timeout", "20"], log: dir + "/stranger.log")
        #expect(stranger.wait(timeout: 60) != 0)
        #expect(stranger.output.contains("authentication failed"), "\(stranger.output)")
        let joiner = try Child(["worker", "--coordinator", endpoint], log: dir + "/joiner.log")
        #expect(coordinator.waitForOutput("asks to join the running run", timeout: 60), "\(coordinator.output)")
        let extra = try Child(["worker", "--coordinator", endpoint], log: dir + "/extra.log")
        #expect(extra.wait(timeout: 60) != 0)
        #expect(extra.output.contains("refused this worker: the run already has 3 worker(s)") && extra.output.contains("its --max-workers 3"),
                "\(extra.output)")
        #expect(coordinator.wait(timeout: 300) == 0, "\(coordinator.output)")
        for worker in members + [joiner] { #expect(worker.wait(timeout: 60) == 0, "\(worker.output)") }
        #expect(joiner.output.contains("rank 2: received the training state of step"), "\(joiner.output)")
        let changes = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "membership" }
        try #require(changes.count == 1, "\(coordinator.output)")
        #expect(changes[0]["world_size"] as? Int == 3 && changes[0]["joined_ranks"] as? [Int] == [2], "\(changes[0])")
        #expect(try readMetrics(dir + "/m.jsonl").filter { $0["step"] as? Int == 149 }.count == 3)
    }

    /// Two of four killed at once, with dropout (its masks are a function of seed, rank and step) and a
    /// seed of its own: given the steps at which the members changed, the run is reproducible bit for
    /// bit (the reference trains the same segments, each resumed from a checkpoint of the one before).
    @Test func twoOfFourKilledAndTheRunIsReproducibleGivenTheStepsOfTheChanges() throws {
        let dir = try temporaryDirectory("elastic-two")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = ["--steps", "30", "--batch-size", "24", "--no-eval", "--lr", "0.01", "--seed", "3"]
        let launch = try Child(["launch", "--workers", "4", "--elastic", "--metrics", dir + "/m.jsonl", "--save-weights", dir + "/elastic.safetensors"]
                               + common, log: dir + "/launch.log")
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline && launch.process.isRunning && (try? readMetrics(dir + "/m.jsonl"))?.contains(where: { $0["step"] as? Int == 6 }) != true {
            usleep(50_000)
        }
        let victims = [" --rank 1 ", " --rank 2 "].compactMap { childProcess(of: launch.process.processIdentifier, containing: $0) }
        try #require(victims.count == 2, "\(launch.output)")
        for pid in victims { kill(pid, SIGKILL) }
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        let all = try readAllMetrics(dir + "/m.jsonl")
        let changes = all.filter { $0["event"] as? String == "membership" }
        try #require((1...2).contains(changes.count) && changes.last?["world_size"] as? Int == 2, "\(launch.output)")
        #expect(changes.flatMap { $0["lost_ranks"] as? [Int] ?? [] }.count == 2, "\(changes)")
        // The segments: 4 workers, then (if the two losses were learnt apart) 3, then 2.
        var epochs = [(fromStep: 0, worldSize: 4)]
        for change in changes { epochs.append((try #require(change["from_step"] as? Int), try #require(change["world_size"] as? Int))) }
        expectWorldSizes(all, steps: 30, epochs: epochs.enumerated().filter { i, e in i + 1 == epochs.count || epochs[i + 1].fromStep > e.fromStep }.map(\.1))
        let segments = epochs.indices.compactMap { i -> (workers: Int, until: Int?)? in
            let until = i + 1 < epochs.count ? epochs[i + 1].fromStep : nil
            return until == epochs[i].fromStep ? nil : (epochs[i].worldSize, until)
        }
        try reference(segments, common, in: dir)
        let difference = try byteDifference(dir + "/elastic.safetensors", dir + "/reference.safetensors")
        #expect(difference == nil, "\(difference ?? "")")
    }

    /// With error feedback (`--compress int8`; top-k around the star's hub; top-k with DGC's momentum
    /// correction, whose velocity travels with the residual) the survivors keep their residuals across
    /// the change and the lost rank's goes with it; the run finishes.
    @Test(arguments: [["--compress", "int8"], ["--compress", "topk:0.01", "--allreduce", "star"],
                      ["--compress", "topk:0.01", "--momentum-correction", "--local-clip-norm", "5", "--sparsity-warmup-epochs", "1"]])
    func aKilledWorkerWithACodecLeavesTheSurvivorsTheirResiduals(codec: [String]) throws {
        let dir = try temporaryDirectory("elastic-codec")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (launch, _) = try launchAndSignal(SIGKILL, atStep: 6, ["--elastic"] + codec + Self.common, in: dir)
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        let changes = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "membership" }
        #expect(changes.count == 1 && changes.first?["world_size"] as? Int == 2, "\(launch.output)")
        for rank in 0..<2 {
            #expect(launch.output.contains("rank \(rank): error-feedback residual kept across the change of members"), "\(launch.output)")
        }
        #expect(launch.output.contains("scaled by 2/3"), "\(launch.output)")
        #expect(try readMetrics(dir + "/m.jsonl").filter { $0["step"] as? Int == 29 }.count == 2)
    }

    /// Under a scheduler (`join --elastic`, torchrun's variables set by hand): rank 2's process is killed
    /// and the scheduler starts it again with the same command line; it joins the running run.
    @Test func aRankRestartedByTheSchedulerJoinsTheRunningRun() throws {
        let dir = try temporaryDirectory("elastic-sched")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freeTCPPort()
        func rank(_ r: Int, _ tag: String) throws -> Child {
            try Child(["join", "--elastic", "--dropout", "0", "--lr", "0.01"] + JoinTests.options(metrics: dir + "/m.jsonl", steps: 150),
                      log: dir + "/\(tag).log",
                      environment: JoinTests.noLauncher.merging(["RANK": "\(r)", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "\(port)"]) { $1 })
        }
        let ranks = try [2, 1, 0].map { try rank($0, "rank\($0)") }.reversed() as [Child]
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline && ranks[0].process.isRunning && (try? readMetrics(dir + "/m.jsonl"))?.contains(where: { $0["step"] as? Int == 5 }) != true {
            usleep(50_000)
        }
        kill(ranks[2].process.processIdentifier, SIGKILL)
        let restarted = try rank(2, "rank2-restarted")
        for (r, c) in [ranks[0], ranks[1], restarted].enumerated() { #expect(c.wait(timeout: 300) == 0, "rank \(r):\n\(c.output)") }
        let changes = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "membership" }
        #expect(changes.map { $0["world_size"] as? Int } == [2, 3], "\(ranks[0].output)")
        #expect(changes.last?["joined_ranks"] as? [Int] == [2], "\(changes)")
        #expect(restarted.output.contains("rank 2: received the training state of step"), "\(restarted.output)")
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
