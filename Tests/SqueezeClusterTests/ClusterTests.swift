import Foundation
import Testing
import SqueezeComm
import SqueezeEngine
import SqueezeTraining
@testable import SqueezeCluster

/// Real processes on loopback: a coordinator and workers of the built `squeezetrain`.
@Suite("Cluster (real processes over ZeroMQ)", .serialized)
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

    @Test(arguments: [2, 3])
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

    @Test func starSendsWholeGradientsThroughTheCoordinator() throws {
        let (dir, coordinator) = try runCluster(workers: 2, ["--steps", "2", "--batch-size", "16", "--allreduce", "star", "--no-augment"])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lines = try readMetrics(dir + "/metrics.jsonl")
        #expect(lines.count == 4)
        for line in lines {
            #expect(line["allreduce_bytes_sent"] as? Int == 4 * parameters)
            #expect(line["allreduce_bytes_received"] as? Int == 4 * parameters)
        }
        #expect(coordinator.output.contains("the coordinator (star hub) received \(grouped(2 * 2 * 4 * parameters))"))
    }

    /// What crosses the wire with compression, counted by the workers' transports, against the
    /// collectives' own formulas per bucket; the metrics carry the uncompressed reference and the ratio.
    @Test(arguments: [("fp16", AllReduceAlgorithm.ring), ("int8", .star), ("topk:0.01", .ring), ("bf16", .star)])
    func compressedBytesMatchTheCodecs(compress: String, algorithm: AllReduceAlgorithm) throws {
        let (dir, coordinator) = try runCluster(workers: 2, ["--steps", "2", "--batch-size", "16", "--compress", compress,
                                                             "--allreduce", algorithm.rawValue, "--bucket-mb", "0.5"])
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(coordinator.output.contains("--compress \(compress)"))
        let compression = try GradientCompression(parsing: compress)
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 524_288)
        let chunk = CollectiveOptions().chunkBytes
        let lines = try readMetrics(dir + "/metrics.jsonl")
        #expect(lines.count == 4)
        for line in lines {
            let rank = line["rank"] as! Int, sent = line["allreduce_bytes_sent"] as! Int
            let dense = algorithm == .ring
                ? plan.reduce(0) { $0 + ringPayloadBytes(count: $1.count, worldSize: 2, rank: rank).sent }
                : 4 * parameters
            #expect(line["dense_bytes_sent"] as? Int == dense)
            let ratio = try #require(line["compression_ratio"] as? Double)
            #expect(abs(ratio - Double(dense) / Double(sent)) < 1e-3 * ratio)
            if case .topk(let f) = compression {
                // Every bucket's k pairs cross one link (N = 2), unless some of its largest entries are 0.
                let k = plan.reduce(0) { $0 + GradientCompression.topkPairs(fraction: f, count: $1.count) }
                #expect(sent <= 8 * k && sent > 8 * k * 9 / 10)
                #expect(line["theory_bytes_sent"] as? Int == 8 * k)
            } else {
                let expected = algorithm == .ring
                    ? plan.reduce(0) { $0 + ringPayloadBytes(
                        count: $1.count, worldSize: 2, rank: rank, compression: compression, chunkBytes: chunk)!.sent }
                    : plan.reduce(0) { $0 + compression.densePayloadBytes(count: $1.count, chunkBytes: chunk)! }
                #expect(sent == expected)
                #expect(line["allreduce_bytes_received"] as? Int == expected)
                #expect(line["theory_bytes_sent"] as? Int == expected)
                #expect(ratio > (compression == .int8 ? 3.9 : 1.99))
            }
        }
    }

    @Test func badPeersAreRejectedAndTheCoordinatorKeepsRunning() throws {
        let dir = try temporaryDirectory("badpeer")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "1", "--steps", "2", "--batch-size", "8", "--no-augment", "--no-eval"], in: dir)
        let context = try ZMQContext()
        defer { context.terminate() }
        let peer = try ZMQSocket(context: context, type: .dealer)
        try peer.connect(endpoint)
        var wrongVersion = ControlMessage.hello(Hello(protocolVersion: 1, host: "test", pid: 1, requestedRank: nil, threads: 1)).encoded()
        wrongVersion[4] = 7
        let truncated = Array(ControlMessage.heartbeat(Heartbeat(rank: 0, step: 0)).encoded().dropLast(2))
        var unknown = ControlMessage.stop(Stop(reason: "x")).encoded()
        unknown[6] = 42
        for (frame, words) in [(wrongVersion, "protocol version 7"), (truncated, "truncated"), (unknown, "unknown message kind 42")] {
            _ = try frame.withUnsafeBytes { try peer.send($0) }
            let reply = try #require(try peer.receive(timeout: .seconds(10)), "no reply to a bad frame (\(words))")
            let message = try reply.withUnsafeBytes { try ControlMessage.decode($0, from: "coordinator") }
            guard case .reject(let r) = message else { Issue.record("expected a rejection, got \(message.kind)"); continue }
            #expect(r.reason.contains(words) && r.reason.contains("unregistered peer"), "\(r.reason)")
        }
        peer.close()
        // A worker whose Ready describes a different model is refused; a proper one then completes the run.
        let impostor = try ZMQSocket(context: context, type: .dealer)
        try impostor.connect(endpoint)
        _ = try ControlMessage.hello(Hello(protocolVersion: ControlMessage.version, host: "impostor", pid: 2, requestedRank: nil, threads: 1))
            .encoded().withUnsafeBytes { try impostor.send($0) }
        let welcome = try #require(try impostor.receive(timeout: .seconds(10)))
        guard case .welcome(let w) = try welcome.withUnsafeBytes({ try ControlMessage.decode($0, from: "coordinator") }) else {
            Issue.record("no welcome"); return
        }
        var model = w.config.model
        model.batchNorm = true
        _ = try ControlMessage.ready(Ready(rank: w.rank, model: model, parameterCount: 1, parametersChecksum: "0", dataEndpoint: "tcp://127.0.0.1:1"))
            .encoded().withUnsafeBytes { try impostor.send($0) }
        let refusal = try #require(try impostor.receive(timeout: .seconds(10)))
        guard case .reject(let r) = try refusal.withUnsafeBytes({ try ControlMessage.decode($0, from: "coordinator") }) else {
            Issue.record("impostor not rejected"); return
        }
        #expect(r.reason.contains("worker rank 0") && r.reason.contains("model configuration differs"), "\(r.reason)")
        impostor.close()

        let worker = try Child(["worker", "--coordinator", endpoint], log: dir + "/worker.log")
        #expect(coordinator.wait() == 0, "\(coordinator.output)")
        #expect(worker.wait(timeout: 30) == 0, "\(worker.output)")
    }

    @Test func aLostWorkerIsReportedByRankAndTheRunStops() throws {
        let dir = try temporaryDirectory("lost")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "2", "--steps", "100000", "--batch-size", "16", "--timeout", "3", "--no-eval"], in: dir)
        let w0 = try Child(["worker", "--coordinator", endpoint, "--rank", "0"], log: dir + "/w0.log")
        let w1 = try Child(["worker", "--coordinator", endpoint, "--rank", "1"], log: dir + "/w1.log")
        #expect(coordinator.waitForOutput("all 2 worker(s) ready"), "\(coordinator.output)")
        usleep(1_500_000)  // a few steps
        kill(w1.process.processIdentifier, SIGKILL)
        let status = coordinator.wait(timeout: 60)
        #expect(status != 0)
        let out = coordinator.output
        #expect(out.contains("worker rank 1 stopped answering at step") || out.contains("worker rank 0 failed at step"), "\(out)")
        #expect(w0.wait(timeout: 30) != 0)
    }

    /// Workers started by hand (no launcher watching) notice a dead coordinator by its silence.
    @Test func workersStopWhenTheCoordinatorFallsSilent() throws {
        let dir = try temporaryDirectory("silent")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "2", "--steps", "100000", "--batch-size", "16", "--timeout", "3", "--no-eval"], in: dir)
        let workers = try (0..<2).map { try Child(["worker", "--coordinator", endpoint], log: dir + "/w\($0).log") }
        #expect(coordinator.waitForOutput("all 2 worker(s) ready"), "\(coordinator.output)")
        usleep(1_500_000)  // a few steps
        kill(coordinator.process.processIdentifier, SIGKILL)
        for (i, w) in workers.enumerated() {
            #expect(w.wait(timeout: 30) != 0, "worker \(i) kept running without a coordinator")
            #expect(w.output.contains("has been silent for"), "worker \(i):\n\(w.output)")
        }
    }

    @Test func rendezvousTimeoutNamesTheMissingRanks() throws {
        let dir = try temporaryDirectory("rendezvous")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "2", "--steps", "1", "--join-timeout", "3"], in: dir)
        let w0 = try Child(["worker", "--coordinator", endpoint, "--rank", "0", "--join-timeout", "10"], log: dir + "/w0.log")
        #expect(coordinator.wait(timeout: 60) != 0)
        #expect(coordinator.output.contains("1 of 2 worker(s) joined; rank(s) still missing: 1"), "\(coordinator.output)")
        #expect(w0.wait(timeout: 30) != 0)
        #expect(w0.output.contains("aborted"), "\(w0.output)")
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

@Suite("launch (real processes)", .serialized)
struct LaunchTests {
    @Test func launchRunsAClusterAndPrefixesLines() throws {
        let dir = try temporaryDirectory("launch")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "2", "--steps", "2", "--batch-size", "16", "--no-eval", "--metrics", dir + "/m.jsonl"], log: dir + "/launch.log")
        #expect(launch.wait() == 0, "\(launch.output)")
        let out = launch.output
        #expect(out.contains("[coordinator] all 2 worker(s) ready"))
        #expect(out.contains("[worker 0] rank 0 of 2") && out.contains("[worker 1] rank 1 of 2"))
        #expect(try readMetrics(dir + "/m.jsonl").count == 4)
    }

    @Test func bindToCoreGivesEachWorkerItsOwnCPUs() throws {
        let dir = try temporaryDirectory("launchbind")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "2", "--steps", "2", "--batch-size", "16", "--no-eval", "--bind-to", "core"], log: dir + "/launch.log")
        #expect(launch.wait() == 0, "\(launch.output)")
        for r in 0..<2 {
            let cpus = CPUAffinity.cpus(forLocalRank: r).map(String.init).joined(separator: ",")
            #expect(launch.output.contains("[worker \(r)] bound to CPU(s) \(cpus)\n"), "\(launch.output)")
        }
        let bad = try Child(["worker", "--coordinator", "tcp://127.0.0.1:1", "--cpus", "3-1"], log: dir + "/bad.log")
        #expect(bad.wait() != 0)
        #expect(bad.output.contains("--cpus") && bad.output.contains("\"3-1\""), "\(bad.output)")
    }

    @Test func launchNamesAFailingProcessAndExitsNonZero() throws {
        let dir = try temporaryDirectory("launchfail")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "2", "--steps", "2", "--batch-size", "16", "--data", dir + "/no-such-dir"], log: dir + "/launch.log")
        #expect(launch.wait() != 0)
        #expect(launch.output.range(of: #"launch: worker \d \(pid \d+\) exited with status 1"#, options: .regularExpression) != nil, "\(launch.output)")
    }

    @Test func sigtermStopsTheWholeCluster() throws {
        let dir = try temporaryDirectory("launchterm")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let launch = try Child(["launch", "--workers", "2", "--steps", "100000", "--batch-size", "16", "--no-eval"], log: dir + "/launch.log")
        #expect(launch.waitForOutput("all 2 worker(s) ready"), "\(launch.output)")
        kill(launch.process.processIdentifier, SIGTERM)
        #expect(launch.wait(timeout: 60) == 128 + SIGTERM, "\(launch.output)")
        #expect(launch.output.contains("stopped by signal 15"))
    }
}

@Suite("export (real process)")
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

@Suite("Cluster checkpoints (real processes)", .serialized)
struct ClusterCheckpointTests {
    func cluster(_ n: Int, _ args: [String], in dir: String, tag: String) throws {
        let (coordinator, endpoint) = try startCoordinator(["--workers", "\(n)", "--no-eval"] + args, in: dir + "/" + tag)
        let workers = try (0..<n).map { try Child(["worker", "--coordinator", endpoint], log: dir + "/\(tag)-worker\($0).log") }
        #expect(coordinator.wait() == 0, "\(coordinator.output)")
        for w in workers { #expect(w.wait(timeout: 30) == 0, "\(w.output)") }
    }

    @Test func resumeIsBitExactAndWorksWithAnotherWorldSize() throws {
        let dir = try temporaryDirectory("cluster-ckpt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for t in ["straight", "first", "second", "third"] { try FileManager.default.createDirectory(atPath: dir + "/" + t, withIntermediateDirectories: true) }
        // Shuffle, augmentation and dropout on; a constant rate so that a 2-step run and the first half of a
        // 4-step run agree. Mid-epoch: 4 of 2,083 steps per epoch.
        let common = ["--batch-size", "24", "--schedule", "constant", "--lr", "0.02"]
        try cluster(2, common + ["--steps", "4", "--save-weights", dir + "/straight.safetensors"], in: dir, tag: "straight")
        try cluster(2, common + ["--steps", "2", "--checkpoint-dir", dir + "/ckpt"], in: dir, tag: "first")
        try cluster(2, common + ["--steps", "4", "--checkpoint-dir", dir + "/ckpt", "--resume", "--save-weights", dir + "/resumed.safetensors"],
                    in: dir, tag: "second")
        let difference = try byteDifference(dir + "/straight.safetensors", dir + "/resumed.safetensors")
        #expect(difference == nil, "resumed weights differ from the uninterrupted run: \(difference ?? "")")
        let log = try String(contentsOfFile: dir + "/second/coordinator.log", encoding: .utf8)
        #expect(log.contains("resuming from") && log.contains("at step 2"))
        // The same global batch over 3 workers continues from the 4-step checkpoint.
        try cluster(3, common + ["--steps", "6", "--checkpoint-dir", dir + "/ckpt", "--resume"], in: dir, tag: "third")
        #expect(FileManager.default.fileExists(atPath: dir + "/ckpt/checkpoint-000000006.safetensors"))
    }

    @Test(arguments: ["int8", "topk:0.01"])
    func resumeKeepsEveryRanksErrorFeedback(_ codec: String) throws {
        let dir = try temporaryDirectory("cluster-residual")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for t in ["straight", "first", "second", "third"] { try FileManager.default.createDirectory(atPath: dir + "/" + t, withIntermediateDirectories: true) }
        // Each rank's unsent gradient mass must survive the restart, or the resumed weights drift.
        let common = ["--batch-size", "24", "--schedule", "constant", "--lr", "0.02", "--compress", codec]
        try cluster(2, common + ["--steps", "4", "--save-weights", dir + "/straight.safetensors"], in: dir, tag: "straight")
        try cluster(2, common + ["--steps", "2", "--checkpoint-dir", dir + "/ckpt"], in: dir, tag: "first")
        for rank in 0..<2 { #expect(FileManager.default.fileExists(atPath: ResidualFile.path(directory: dir + "/ckpt", step: 2, rank: rank))) }
        try cluster(2, common + ["--steps", "4", "--checkpoint-dir", dir + "/ckpt", "--resume", "--save-weights", dir + "/resumed.safetensors"],
                    in: dir, tag: "second")
        let difference = try byteDifference(dir + "/straight.safetensors", dir + "/resumed.safetensors")
        #expect(difference == nil, "resumed weights differ from the uninterrupted run: \(difference ?? "")")
        let worker1 = try String(contentsOfFile: dir + "/second-worker1.log", encoding: .utf8)
        #expect(worker1.contains("error-feedback residual restored from"), "\(worker1)")
        // Three workers cannot take over two ranks' residuals: they say so and start from zero.
        try cluster(3, common + ["--steps", "6", "--checkpoint-dir", dir + "/ckpt", "--resume"], in: dir, tag: "third")
        let logs = try (0..<3).map { try String(contentsOfFile: dir + "/third-worker\($0).log", encoding: .utf8) }.joined()
        #expect(logs.contains("world_size is 2, this run needs 3") && logs.contains("rank2.safetensors does not exist")
                && !logs.contains("restored"), "\(logs)")
    }
}

@Suite("launch --max-restarts (real processes)", .serialized)
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

    @Test func aKilledCoordinatorIsRestartedAndTheWorkersRejoin() throws {
        let dir = try temporaryDirectory("restart-coordinator")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freeTCPPort()
        let launch = try restartableLaunch(port: port, restarts: 2, in: dir)
        #expect(launch.waitForOutput("checkpoint at step 20"), "\(launch.output)")
        try killProcesses(matching: "coordinator --bind tcp://127.0.0.1:\(port)")
        #expect(launch.wait(timeout: 300) == 0, "\(launch.output)")
        let restarts = try readAllMetrics(dir + "/m.jsonl").filter { $0["event"] as? String == "restart" }
        #expect(restarts.first?["process"] as? String == "coordinator", "\(restarts)")
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

@Suite("Checkpoint writes survive SIGKILL (real processes)", .serialized)
struct CrashDuringWriteTests {
    @Test func latestAlwaysVerifies() throws {
        let dir = try temporaryDirectory("crash-write")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A checkpoint after every step; SIGKILL at varying moments, resuming each time.
        for round in 0..<6 {
            let train = try Child(["train", "--steps", "400", "--batch-size", "8", "--no-eval", "--checkpoint-dir", dir + "/ckpt",
                                   "--checkpoint-every", "1", "--keep-checkpoints", "2", "--resume"], log: dir + "/train\(round).log")
            _ = train.waitForOutput("checkpoint at step")
            usleep(UInt32(50_000 + 97_000 * round))
            kill(train.process.processIdentifier, SIGKILL)
            train.process.waitUntilExit()
            let latest = try String(contentsOfFile: dir + "/ckpt/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            let checkpoint = try Checkpoint.load(path: dir + "/ckpt/" + latest)  // throws if it does not verify
            #expect(checkpoint.step >= 1)
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir + "/ckpt").filter { $0.hasPrefix(".") }
            #expect(leftovers.count <= 1, "temporary files pile up: \(leftovers)")  // at most the killed writer's
        }
    }
}

@Suite("Stopping a cluster with a checkpoint (real processes)", .serialized)
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
        guard let r = out.range(of: #"stopping after step (\d+)"#, options: .regularExpression) else {
            Issue.record("no stop step announced:\n\(out)"); return
        }
        let stopStep = Int(out[r].split(separator: " ").last!)!
        #expect(out.contains("rank 0: checkpoint at step \(stopStep)"))
        #expect(!out.contains("stopped answering") && !out.contains("timed out"), "\(out)")
        let latest = try String(contentsOfFile: dir + "/ckpt/latest", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try Checkpoint.load(path: dir + "/ckpt/" + latest).step == stopStep)
        // …and the run continues from there.
        let resumed = try Child(args + ["--steps", "\(stopStep + 2)", "--resume"], log: dir + "/resume.log")
        #expect(resumed.wait() == 0, "\(resumed.output)")
        #expect(resumed.output.contains("at step \(stopStep)"))
    }
}

@Suite("train stops cleanly on SIGTERM (real process)", .serialized)
struct TrainSignalTests {
    @Test func sigtermCheckpointsAndExits() throws {
        let dir = try temporaryDirectory("train-signal")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for round in 0..<3 {  // a signal handler that ran inside an allocation used to corrupt the heap now and then
            let train = try Child(["train", "--steps", "100000", "--batch-size", "16", "--no-eval", "--checkpoint-dir", dir + "/ckpt"],
                                  log: dir + "/train\(round).log")
            #expect(train.waitForOutput("training squeezenet1_1"), "\(train.output)")
            usleep(UInt32(700_000 + 400_000 * round))
            kill(train.process.processIdentifier, SIGTERM)
            #expect(train.wait(timeout: 60) == 128 + SIGTERM, "\(train.output)")
            #expect(train.output.contains("checkpoint at step") && train.output.contains("resume with --resume"), "\(train.output)")
        }
    }
}
