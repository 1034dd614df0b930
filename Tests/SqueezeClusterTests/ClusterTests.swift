import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining
@testable import SqueezeCluster

/// Real processes on loopback: a coordinator and workers of the built `squeezetrain`.
@Suite("Cluster (real processes over ZeroMQ)", .serialized, .timeLimit(.minutes(10)))
struct ClusterTests {
    let parameters = Network(config: ModelConfig()).parameters.count  // 727,626

    /// Runs coordinator + `n` workers to completion; returns the directory with metrics and weights.
    func runCluster(workers n: Int, _ extra: [String]) throws -> (dir: String, coordinator: Child) {
        let dir = try temporaryDirectory("cluster\(n)")
        let (coordinator, endpoint) = try startCoordinator(
            ["--workers", "\(n)", "--no-eval", "--metrics", dir + "/metrics.jsonl", "--save-weights", dir + "/cluster.safetensors"] + extra, in: dir)
        let workers = try (0..<n).map { try Child(["worker", "--coordinator", endpoint], log: dir + "/worker\($0).log") }
        let status = coordinator.wait()
        for (i, w) in workers.enumerated() {
            #expect(w.wait(timeout: 30) == 0, "worker \(i):\n\(w.output)")
        }
        #expect(status == 0, "coordinator:\n\(coordinator.output)")
        return (dir, coordinator)
    }

    /// The exact bytes over real sockets (the other world sizes and codecs: InProcessClusterTests).
    @Test(arguments: [2])
    func ringBytesMatchTheoryAndWorkersEqualOneProcess(workers n: Int) throws {
        let common = ["--steps", "3", "--batch-size", "24", "--dropout", "0", "--init-weights", goldenWeights, "--lr", "0.01"]
        let (dir, _) = try runCluster(workers: n, common + ["--bucket-mb", "0.5"])
        defer { try? FileManager.default.removeItem(atPath: dir) }

        // One line per worker per step, and the ring's bytes exactly: per bucket, what RingAllReduce sends.
        let lines = try readMetrics(dir + "/metrics.jsonl")
        #expect(lines.count == 3 * n)
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        for line in lines {
            let rank = line["rank"] as! Int
            let expected = plan.map { ringPayloadBytes(count: $0.count, worldSize: n, rank: rank) }
            #expect(line["allreduce_bytes_sent"] as? Int == expected.reduce(0) { $0 + $1.sent })
            #expect(line["allreduce_bytes_received"] as? Int == expected.reduce(0) { $0 + $1.received })
            #expect(line["world_size"] as? Int == n)
            for key in ["loss", "images", "control_bytes", "allreduce_seconds", "compute_seconds"] { #expect(line[key] != nil, "\(key)") }
        }
        // Summed over the ranks of a step: 2(N−1) × 4P, i.e. 2(N−1)/N × 4P per worker on average.
        for step in 0..<3 {
            let total = lines.filter { $0["step"] as? Int == step }.reduce(0) { $0 + ($1["allreduce_bytes_sent"] as! Int) }
            #expect(total == 2 * (n - 1) * 4 * parameters)
        }

        // The same 3 steps in one process with the same global batch.
        let single = try Child(["train"] + common + ["--no-eval", "--save-weights", dir + "/single.safetensors"], log: dir + "/single.log")
        #expect(single.wait() == 0, "\(single.output)")
        let a = Network(config: ModelConfig()), b = Network(config: ModelConfig())
        try a.loadWeights(from: dir + "/cluster.safetensors")
        try b.loadWeights(from: dir + "/single.safetensors")
        let x = a.parameters.copyValues(), y = b.parameters.copyValues()
        let scale = y.reduce(Float(0)) { max($0, abs($1)) }
        let err = zip(x, y).reduce(Float(0)) { max($0, abs($1.0 - $1.1)) } / scale
        #expect(err < 1e-5, "\(n) workers vs one process: max relative difference \(err)")
        #expect(x != Network(config: ModelConfig()).parameters.copyValues())
    }

}

func grouped(_ n: Int) -> String {
    let s = String(n)
    var out = ""
    for (i, c) in s.enumerated() {
        if i > 0 && (s.count - i) % 3 == 0 { out.append(",") }
        out.append(c)
    }
    return out
}

@Suite("launch (real processes)", .serialized, .timeLimit(.minutes(10)))
struct LaunchTests {
    @Test func launchRunsAClusterAndPrefixesLines() throws {
        let dir = try temporaryDirectory("launch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "2", "--steps", "2", "--batch-size", "16", "--no-eval", "--metrics", dir + "/m.jsonl",
                                "--bind-to", "core"], log: dir + "/launch.log")
        #expect(launch.wait() == 0, "\(launch.output)")
        let out = launch.output
        #expect(out.contains("[coordinator] all 2 worker(s) ready"))
        #expect(out.contains("[worker 0] rank 0 of 2") && out.contains("[worker 1] rank 1 of 2"))
        // The local default: both planes on ipc in the private directory, nothing sealed, and the start line says so.
        #expect(out.contains("[launch] 2 worker(s); control plane on ipc in ") && out.contains("nothing sealed"), "\(out)")
        #expect(out.contains("coordinator at ipc://") && out.contains("data plane ipc://"), "\(out)")
        #expect(try readMetrics(dir + "/m.jsonl").count == 4)
        #expect(!out.contains(ClusterEvent.linePrefix))  // events go to launch, not to the terminal
        // --bind-to core: the executable binds each worker to CPUs of its own.
        for r in 0..<2 {
            let cpus = CPUAffinity.cpus(forLocalRank: r).map(String.init).joined(separator: ",")
            #expect(launch.output.contains("[worker \(r)] bound to CPU(s) \(cpus)\n"), "\(launch.output)")
        }
        // --transport tcp: today's tcp planes, the control plane under CURVE, the data plane sealed; the same bytes of gradient.
        let tcp = try Child(["launch", "--workers", "2", "--steps", "2", "--batch-size", "16", "--no-eval", "--metrics", dir + "/tcp.jsonl",
                             "--transport", "tcp"], log: dir + "/tcp.log")
        #expect(tcp.wait() == 0, "\(tcp.output)")
        #expect(tcp.output.contains("[launch] 2 worker(s); control plane on tcp (CURVE), data plane on tcp, every frame sealed with AES-256-GCM"),
                "\(tcp.output)")
        #expect(tcp.output.contains("coordinator at tcp://") && tcp.output.contains("data plane tcp://"), "\(tcp.output)")
        let (ipcLines, tcpLines) = (try readMetrics(dir + "/m.jsonl"), try readMetrics(dir + "/tcp.jsonl"))
        for (a, b) in zip(ipcLines, tcpLines) {
            #expect(a["allreduce_bytes_sent"] as? Int == b["allreduce_bytes_sent"] as? Int)
            #expect(b["allreduce_bytes_sent"] as? Int == b["theory_bytes_sent"] as? Int)
            // The seal's nonce and tag (28 bytes a frame) are control bytes.
            #expect((b["control_bytes"] as? Int ?? 0) > (a["control_bytes"] as? Int ?? 0), "\(a) \(b)")
        }
        let bad = try Child(["worker", "--coordinator", "tcp://127.0.0.1:1", "--cpus", "3-1"], log: dir + "/bad.log")
        #expect(bad.wait() != 0)
        #expect(bad.output.contains("--cpus") && bad.output.contains("\"3-1\""), "\(bad.output)")
    }
}

@Suite("launch --allreduce tree (real processes)", .serialized, .timeLimit(.minutes(10)))
struct LaunchTreeTests {
    /// Three workers over real sockets: the root (rank 0, two children) sends 2 × 4P per step, the
    /// leaves 4P each, and every rank's metrics line and summary row carry its own theory.
    @Test func everyRankSendsItsOwnTheory() throws {
        let dir = try temporaryDirectory("launch-tree")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "3", "--allreduce", "tree", "--steps", "2", "--batch-size", "12", "--no-eval",
                                "--metrics", dir + "/m.jsonl"], log: dir + "/launch.log")
        #expect(launch.wait() == 0, "\(launch.output)")
        let lines = try readMetrics(dir + "/m.jsonl")
        #expect(lines.count == 6)
        let copy = 4 * Network(config: ModelConfig()).parameters.count
        for line in lines {
            let rank = line["rank"] as! Int, sent = line["allreduce_bytes_sent"] as? Int
            #expect(sent == copy * [2, 1, 1][rank], "rank \(rank)")
            #expect(sent == line["theory_bytes_sent"] as? Int, "rank \(rank)")
            #expect(line["allreduce_bytes_received"] as? Int == sent, "rank \(rank)")
        }
        // The summary: per rank, bytes sent per step, received, its theory and their ratio.
        let mb = { (bytes: Int) in megabytes(Double(bytes)) }
        for (rank, edges) in [2, 1, 1].enumerated() {
            let row = launch.output.split(separator: "\n").first { $0.hasPrefix("[coordinator] \(rank)     ") }
            #expect(row.map { $0.contains(mb(copy * edges)) && $0.contains("1.0000") } == true, "rank \(rank): \(launch.output)")
        }
    }
}

@Suite("export (real process)", .timeLimit(.minutes(10)))
struct ExportTests {
    @Test func exportWritesTheCheckpointsWeights() throws {
        let dir = try temporaryDirectory("export")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let train = try Child(["train", "--steps", "2", "--batch-size", "16", "--no-eval", "--checkpoint-dir", dir + "/ckpt",
                               "--save-weights", dir + "/trained.safetensors"], log: dir + "/train.log")
        #expect(train.wait() == 0, "\(train.output)")
        let export = try Child(["export", "--checkpoint", dir + "/ckpt", "--output", dir + "/exported.safetensors"], log: dir + "/export.log")
        #expect(export.wait() == 0, "\(export.output)")
        let difference = try byteDifference(dir + "/trained.safetensors", dir + "/exported.safetensors")
        #expect(difference == nil, "\(difference ?? "")")
        let missing = try Child(["export", "--checkpoint", dir + "/nothing", "--output", dir + "/x.safetensors"], log: dir + "/missing.log")
        #expect(missing.wait() != 0)
        #expect(missing.output.contains("\(dir)/nothing does not exist"))
    }
}

@Suite("launch --max-restarts (real processes)", .serialized, .timeLimit(.minutes(10)))
struct RestartTests {
    /// 120 steps of 16 images with a checkpoint every 20, on a known port (to find the processes by).
    func restartableLaunch(port: Int, restarts: Int, in dir: String) throws -> Child {
        try Child(["launch", "--workers", "2", "--port", "\(port)", "--steps", "120", "--batch-size", "16", "--no-eval",
                   "--checkpoint-dir", dir + "/ckpt", "--checkpoint-every", "20", "--max-restarts", "\(restarts)", "--timeout", "3",
                   "--metrics", dir + "/m.jsonl"], log: dir + "/launch.log")
    }

    @Test func aKilledWorkerIsReplacedAndTrainingContinuesFromTheCheckpoint() throws {
        let dir = try temporaryDirectory("restart")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freeTCPPort()
        let launch = try restartableLaunch(port: port, restarts: 1, in: dir)
        #expect(launch.waitForOutput("checkpoint at step 20"), "\(launch.output)")
        try killProcesses(matching: "127.0.0.1:\(port) --rank 1")
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        #expect(launch.output.contains("worker 1 (pid") && launch.output.contains("restart 1 of 1"), "\(launch.output)")
        #expect(launch.output.contains("resuming from"))
        let restarts = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "restart" }
        #expect(restarts.count == 1)
        #expect(restarts.first?["process"] as? String == "worker 1")
        #expect((restarts.first?["resume_step"] as? Int ?? 0) >= 20)
        #expect(FileManager.default.fileExists(atPath: dir + "/ckpt/checkpoint-000000120.safetensors"))
    }

    @Test func restartsNeedACheckpointDirectory() throws {
        let dir = try temporaryDirectory("restart-arg")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--steps", "2", "--max-restarts", "1"], log: dir + "/launch.log")
        #expect(launch.wait() != 0)
        #expect(launch.output.contains("--max-restarts needs --checkpoint-dir"))
    }
}

@Suite("Checkpoint writes survive SIGKILL (real processes)", .serialized, .timeLimit(.minutes(10)))
struct CrashDuringWriteTests {
    @Test func latestAlwaysVerifies() throws {
        let dir = try temporaryDirectory("crash-write")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A checkpoint after every step; SIGKILL at varying moments, resuming each time.
        var previous = 0  // the step of the latest checkpoint the last round left
        for round in 0..<6 {
            // --lr 0.01: at the default 0.05 the plain model at batch 8 diverges within a few steps for some seeds
            // (seen on the generated CIFAR-10 files), and this test is about checkpoints, not learning.
            let train = try Child(["train", "--steps", "400", "--batch-size", "8", "--lr", "0.01", "--no-eval", "--checkpoint-dir", dir + "/ckpt",
                                   "--checkpoint-every", "1", "--keep-checkpoints", "2", "--resume"], log: dir + "/train\(round).log")
            #expect(train.waitForOutput("checkpoint at step"), "round \(round) wrote no checkpoint: \(train.output)")
            usleep(UInt32(50_000 + 97_000 * round))
            kill(train.process.processIdentifier, SIGKILL)
            train.process.waitUntilExit()
            if round > 0 {
                #expect(train.output.contains("at step \(previous) (epoch"), "round \(round) did not resume from step \(previous): \(train.output)")
            }
            let latest = try String(contentsOfFile: dir + "/ckpt/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let checkpoint = try Checkpoint.load(path: dir + "/ckpt/" + latest)  // throws if it does not verify
            #expect(checkpoint.step > previous, "round \(round): the latest checkpoint is step \(checkpoint.step), the run resumed at \(previous)")
            previous = checkpoint.step
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir + "/ckpt").filter { $0.hasPrefix(".") }
            #expect(leftovers.count <= 1, "temporary files pile up: \(leftovers)")  // at most the killed writer's
        }
    }
}

@Suite("Stopping a cluster with a checkpoint (real processes)", .serialized, .timeLimit(.minutes(10)))
struct GracefulStopTests {
    @Test func sigtermCheckpointsWhereTheCoordinatorSaysAndResumes() throws {
        let dir = try temporaryDirectory("graceful")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let args = ["launch", "--workers", "2", "--batch-size", "16", "--no-eval", "--checkpoint-dir", dir + "/ckpt"]
        let launch = try Child(args + ["--steps", "100000"], log: dir + "/launch.log")
        #expect(launch.waitForOutput("all 2 worker(s) ready"), "\(launch.output)")
        usleep(1_000_000)
        kill(launch.process.processIdentifier, SIGTERM)
        #expect(launch.wait(timeout: 120) == 128 + SIGTERM, "\(launch.output)")
        let out = launch.output
        let latest = try String(contentsOfFile: dir + "/ckpt/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let stopStep = try Checkpoint.load(path: dir + "/ckpt/" + latest).step
        #expect(out.contains("stopping after step \(stopStep)") && out.contains("rank 0: checkpoint at step \(stopStep)"), "\(out)")
        #expect(!out.contains("stopped answering") && !out.contains("timed out"), "\(out)")
        // …and the run continues from there.
        let resumed = try Child(args + ["--steps", "\(stopStep + 2)", "--resume"], log: dir + "/resume.log")
        #expect(resumed.wait() == 0, "\(resumed.output)")
        #expect(resumed.output.contains("at step \(stopStep)"))
    }
}

@Suite("train stops cleanly on SIGTERM (real process)", .serialized, .timeLimit(.minutes(10)))
struct TrainSignalTests {
    @Test func sigtermCheckpointsAndExits() throws {
        let dir = try temporaryDirectory("train-signal")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for round in 0..<3 {  // a signal handler that ran inside an allocation used to corrupt the heap now and then
            let train = try Child(["train", "--steps", "100000", "--batch-size", "16", "--no-eval", "--checkpoint-dir", dir + "/ckpt\(round)"],
                                  log: dir + "/train\(round).log")
            #expect(train.waitForOutput("training squeezenet1_1"), "\(train.output)")
            usleep(UInt32(700_000 + 400_000 * round))
            kill(train.process.processIdentifier, SIGTERM)
            #expect(train.wait(timeout: 60) == 128 + SIGTERM, "\(train.output)")
            #expect(train.output.contains("checkpoint at step") && train.output.contains("resume with --resume"), "\(train.output)")
        }
    }
}
