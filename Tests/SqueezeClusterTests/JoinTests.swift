import Foundation
import Testing
import SqueezeTestSupport
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeSystem
@testable import SqueezeCluster

/// `squeezetrain join` under real launchers: processes started by hand with torchrun's variables,
/// Open MPI's `mpirun`, and a real one-node SLURM (`scripts/slurm-local`) with `srun` and the
/// shipped `cluster/slurm/train.sbatch`. Tiny runs: 3 processes, 2 steps, 1 thread each.
@Suite("join (real launchers)", .serialized, .timeLimit(.minutes(10)))
struct JoinTests {
    static let steps = 2
    /// 3 processes × 8 images; no evaluation, so a run is start-up plus two steps.
    static func options(metrics: String, steps: Int = steps, threads: [String] = ["--threads", "1"]) -> [String] {
        ["--steps", "\(steps)", "--batch-size", "24", "--no-eval", "--join-timeout", "90", "--metrics", metrics] + threads
    }

    /// Blanks every launcher variable this test process may have inherited (an empty value counts as unset),
    /// so that only what a test sets describes the job.
    static var noLauncher: [String: String] {
        let prefixes = ["SLURM_", "OMPI_", "PMIX_", "MASTER_"]
        var env = [String: String]()
        for key in ProcessInfo.processInfo.environment.keys
        where prefixes.contains(where: key.hasPrefix) || ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"].contains(key) {
            env[key] = ""
        }
        return env
    }

    /// Every per-worker step line of `metrics` carries exactly the ring's bytes for `n` workers (default
    /// 1 MB buckets): per bucket, what `RingAllReduce` sends and receives.
    static func expectRingBytes(_ metrics: String, workers n: Int, steps: ClosedRange<Int>) throws {
        let lines = try readMetrics(metrics)
        #expect(Set(lines.compactMap { $0["step"] as? Int }) == Set(steps), "steps in \(metrics)")
        #expect(lines.count == n * steps.count)
        try expectRingBytes(lines, workers: n)
    }

    /// Every line carries exactly the ring's bytes for `n` workers, and every rank reported.
    static func expectRingBytes(_ lines: [[String: Any]], workers n: Int) throws {
        let plan = bucketPlan(layerRanges: Network(config: ModelConfig()).layerRanges, bucketBytes: 1 << 20)
        for line in lines {
            let rank = try #require(line["rank"] as? Int)
            let expected = plan.map { ringPayloadBytes(count: $0.count, worldSize: n, rank: rank) }
            #expect(line["world_size"] as? Int == n)
            #expect(line["allreduce_bytes_sent"] as? Int == expected.reduce(0) { $0 + $1.sent }, "rank \(rank) step \(line["step"] ?? "?")")
            #expect(line["allreduce_bytes_received"] as? Int == expected.reduce(0) { $0 + $1.received }, "rank \(rank)")
        }
        #expect(Set(lines.compactMap { $0["rank"] as? Int }) == Set(0..<n))
    }

    /// Processes started by the test with torchrun's four variables only. Ranks 2 and 1 start first and
    /// keep trying to reach rank 0, which starts a moment later. Then a restart with 2 processes and
    /// `--resume` continues from the first run's checkpoint (the scheduler-free version of the sbatch test).
    @Test func torchrunConventionThreeProcesses() throws {
        let dir = try temporaryDirectory("join-torchrun")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func run(_ n: Int, steps: Int, _ extra: [String]) throws -> [Child] {
            let port = try freeTCPPort()
            let children = try (0..<n).reversed().map { r in
                if r == 0 { usleep(500_000) }
                return try Child(["join"] + Self.options(metrics: dir + "/metrics.jsonl", steps: steps) + extra, log: dir + "/\(n)-rank\(r).log",
                                 environment: Self.noLauncher.merging(["RANK": "\(r)", "WORLD_SIZE": "\(n)", "MASTER_ADDR": "127.0.0.1",
                                                                       "MASTER_PORT": "\(port)"]) { $1 })
            }.reversed()
            for (r, c) in children.enumerated() {
                #expect(c.wait() == 0, "rank \(r):\n\(c.output)")
                #expect(c.output.contains("join: torchrun: rank \(r) of \(n) (local rank 0), coordinator 127.0.0.1:\(port); 1 compute thread(s)"),
                        "\(c.output)")
            }
            return Array(children)
        }
        let checkpoints = ["--checkpoint-dir", dir + "/checkpoints"]
        let first = try run(3, steps: Self.steps, checkpoints)
        #expect(first[0].output.contains("\(Self.steps) steps in"), "rank 0 prints the summary:\n\(first[0].output)")
        try Self.expectRingBytes(dir + "/metrics.jsonl", workers: 3, steps: 0...(Self.steps - 1))

        let second = try run(2, steps: Self.steps + 1, checkpoints + ["--resume"])
        #expect(second[0].output.contains("resuming from") && second[0].output.contains("at step \(Self.steps) (written by 3 worker(s))"),
                "\(second[0].output)")
        let resumed = try readMetrics(dir + "/metrics.jsonl").filter { $0["world_size"] as? Int == 2 }
        #expect(resumed.map { $0["step"] as? Int } == [Self.steps, Self.steps], "the resumed run trains one more step, on 2 ranks")
    }

    /// torchrun's agent sets TORCHELASTIC_*: join's coordinator takes MASTER_PORT + 2 (the agent's store
    /// holds MASTER_PORT) and refuses a taken port, naming it and its owner; a restart
    /// (TORCHELASTIC_RESTART_COUNT > 0) continues the checkpoints its first start was let use, without
    /// --resume, and not another run's. One process set up by hand, so it runs without PyTorch.
    @Test func torchrunAgentVariablesByHand() throws {
        let dir = try temporaryDirectory("join-elastic")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let checkpoints = dir + "/checkpoints"
        func join(_ count: Int, steps: Int, port: Int, _ extra: [String] = []) throws -> (status: Int32, output: String) {
            let c = try Child(["join"] + Self.options(metrics: dir + "/metrics.jsonl", steps: steps) + ["--checkpoint-dir", checkpoints] + extra,
                              log: dir + "/\(UUID().uuidString).log",
                              environment: Self.noLauncher.merging(["RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "\(port)",
                                                                    "TORCHELASTIC_RESTART_COUNT": "\(count)", "TORCHELASTIC_MAX_RESTARTS": "3",
                                                                    "TORCHELASTIC_RUN_ID": "test"]) { $1 })
            return (c.wait(timeout: 60), c.output)
        }
        // Something listens on MASTER_PORT + 2 (this test process): refused, naming the port and its holder.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = INADDR_ANY
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        try #require(withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, length) == 0 && listen(listener, 1) == 0 && getsockname(listener, $0, &length) == 0 }
        })
        let taken = Int(UInt16(bigEndian: address.sin_port))
        let refused = try join(0, steps: 2, port: taken - 2)
        close(listener)
        #expect(refused.status == 1, "\(refused.output)")
        #expect(refused.output.contains("coordinator 127.0.0.1:\(taken) (MASTER_PORT + 2: torchrun's own store is on \(taken - 2))"), "\(refused.output)")
        #expect(refused.output.contains("port \(taken) is already taken (Address already in use): pid \(getpid()) (")
                && refused.output.contains("torchrun's agent holds MASTER_PORT \(taken - 2)") && refused.output.contains("join --master-port"),
                "\(refused.output)")

        // A first start, then a restart with a longer run: it continues at step 2 without --resume.
        let first = try join(0, steps: 2, port: try freeTCPPort() - 2)
        #expect(first.status == 0 && first.output.contains("torchrun first start; a restart continues from the newest checkpoint in \(checkpoints)"),
                "\(first.output)")
        let restart = try join(1, steps: 3, port: try freeTCPPort() - 2)
        #expect(restart.status == 0, "\(restart.output)")
        #expect(restart.output.contains("torchrun restart 1 of 3: continues from the newest checkpoint in \(checkpoints), as --resume would")
                && restart.output.contains("resuming from") && restart.output.contains("at step 2"), "\(restart.output)")

        // A new job's first start in that directory is refused as today, and so is its restart: it
        // does not resume the earlier job's checkpoints.
        let stale = try join(0, steps: 4, port: try freeTCPPort() - 2)
        #expect(stale.status == 1 && stale.output.contains("already holds") && stale.output.contains("continue it with --resume"), "\(stale.output)")
        let staleRestart = try join(1, steps: 4, port: try freeTCPPort() - 2)
        #expect(staleRestart.status == 1 && staleRestart.output.contains("torchrun restart 1 of 3, but this torchrun job's first start")
                && staleRestart.output.contains("already holds"), "\(staleRestart.output)")
        #expect(try readMetrics(dir + "/metrics.jsonl").map { $0["step"] as? Int } == [0, 1, 2], "only the first job trained")
    }

    /// torchrun itself, when it is installed (on the PATH, or the venv ../shared/peers/README.md makes at /tmp/pt).
    static func torchrun() throws -> String {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map { "\($0)/torchrun" }
        guard let found = (path + ["/tmp/pt/bin/torchrun"]).first(where: FileManager.default.isExecutableFile) else {
            try Test.cancel("skipped: torchrun not found on the PATH or at /tmp/pt/bin/torchrun (PyTorch's launcher: ../shared/peers/README.md installs it; the project does not install PyTorch for its tests)")
        }
        return found
    }

    /// The issue-31 command: `torchrun --nproc-per-node 2 --no-python squeezetrain join …`, torchrun
    /// choosing MASTER_PORT itself and serving its store there; join's coordinator on MASTER_PORT + 2.
    @Test func realTorchrunTwoProcesses() throws {
        let torchrun = try Self.torchrun()
        let dir = try temporaryDirectory("join-realtorchrun")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = try Child(["--nproc-per-node", "2", "--no-python", squeezetrain, "join"] + Self.options(metrics: dir + "/metrics.jsonl"),
                          log: dir + "/torchrun.log", executable: torchrun, environment: Self.noLauncher)
        #expect(c.wait(timeout: 180) == 0, "\(c.output)")
        for r in 0..<2 {
            let line = try #require(c.output.split(separator: "\n").first { $0.hasPrefix("join: torchrun: rank \(r) of 2 (local rank \(r) of 2), coordinator ") },
                                    "\(c.output)")
            // "… coordinator HOST:P (MASTER_PORT + 2: torchrun's own store is on P-2); …"
            let ports = line.split(whereSeparator: { !$0.isNumber }).compactMap { Int($0) }
            let store = try #require(line.range(of: "torchrun's own store is on ").map { Int(line[$0.upperBound...].prefix { $0.isNumber }) ?? -1 })
            #expect(ports.contains(store + 2) && line.contains(":\(store + 2) (MASTER_PORT + 2"), "\(line)")
            #expect(line.contains("torchrun first start"), "\(line)")
        }
        try Self.expectRingBytes(dir + "/metrics.jsonl", workers: 2, steps: 0...(Self.steps - 1))
    }

    /// torchrun --max-restarts 1: rank 1 is SIGKILLed once a checkpoint exists; torchrun restarts both
    /// processes, which continue from the checkpoint (no --resume given) and finish the run.
    @Test func realTorchrunRestartsFromTheCheckpointWhenRank1IsKilled() throws {
        let torchrun = try Self.torchrun()
        let dir = try temporaryDirectory("join-realtorchrun-restart")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let checkpoints = dir + "/checkpoints", steps = 60
        let c = try Child(["--nproc-per-node", "2", "--max-restarts", "1", "--no-python", squeezetrain, "join"]
                          + Self.options(metrics: dir + "/metrics.jsonl", steps: steps) + ["--checkpoint-dir", checkpoints, "--checkpoint-every", "2"],
                          log: dir + "/torchrun.log", executable: torchrun, environment: Self.noLauncher)
        // The first checkpoint (step 2 of 60), then rank 1 of the first start: a child of torchrun's with RANK=1.
        var victim: pid_t?
        for _ in 0..<2400 where victim == nil && c.process.isRunning {
            if ((try? FileManager.default.contentsOfDirectory(atPath: checkpoints)) ?? []).contains(where: { $0.hasPrefix("checkpoint-") }) { victim = Self.child(of: c.process.processIdentifier, with: ["RANK=1", "TORCHELASTIC_RESTART_COUNT=0"]) }
            if victim == nil { usleep(50_000) }
        }
        let rank1 = try #require(victim, "no checkpoint or no rank 1 process:\n\(c.output)")
        #expect(kill(rank1, SIGKILL) == 0)
        #expect(c.wait(timeout: 240) == 0, "\(c.output)")
        #expect(c.output.contains("torchrun restart 1 of 1: continues from the newest checkpoint in \(checkpoints), as --resume would"), "\(c.output)")
        let resumedAt = try #require(c.output.range(of: "(?<=resuming from \(checkpoints)/checkpoint-)[0-9]+", options: .regularExpression)
            .flatMap { Int(c.output[$0]) }, "\(c.output)")
        #expect(resumedAt >= 2 && resumedAt < steps, "\(c.output)")
        #expect(c.output.contains("rank 0: done after step \(steps)") && c.output.contains("rank 1: done after step \(steps)"), "\(c.output)")
        // The restart's lines: steps resumedAt..<steps, each once per rank, with the ring's exact bytes.
        let lines = try readMetrics(dir + "/metrics.jsonl")
        let after = lines.suffix(2 * (steps - resumedAt))
        #expect(after.map { $0["step"] as? Int ?? -1 }.sorted() == (resumedAt..<steps).flatMap { [$0, $0] }, "the restart trains steps \(resumedAt)..<\(steps)")
        try Self.expectRingBytes(Array(after), workers: 2)
    }

    /// A child of `parent` whose environment holds every one of `variables` ("NAME=value").
    static func child(of parent: pid_t, with variables: [String]) -> pid_t? {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(name), let stat = try? String(contentsOfFile: "/proc/\(name)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // pid (comm) state ppid …
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 1, pid_t(fields[1]) == parent,
                  let environ = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(name)/environ")) else { continue }
            let set = Set(String(decoding: environ, as: UTF8.self).split(separator: "\0").map(String.init))
            if variables.allSatisfy(set.contains) { return pid }
        }
        return nil
    }

    /// The shipped cluster/mpi/run.sh: `mpirun -np 3 … squeezetrain join …`, every rank on this machine;
    /// the thread count left to join (its share of the CPUs) and `--bind-to core` by local rank.
    @Test func openMPIThreeRanks() throws {
        guard let mpirun = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first(where: FileManager.default.isExecutableFile) else {
            try Test.cancel("skipped: mpirun not found (Debian's openmpi-bin; scripts/bootstrap installs it)")
        }
        let dir = try temporaryDirectory("join-mpi")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freeTCPPort()
        let c = try Child(Self.options(metrics: dir + "/metrics.jsonl", threads: ["--bind-to", "core"]), log: dir + "/mpirun.log", executable: packageRoot.appendingPathComponent("cluster/mpi/run.sh").path,
                          environment: Self.noLauncher.merging(["NP": "3", "MPIRUN_ARGS": "--oversubscribe", "MASTER_PORT": "\(port)",
                                                                "SQUEEZETRAIN": squeezetrain, "PATH": (mpirun as NSString).deletingLastPathComponent
                                                                    + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "")]) { $1 })
        #expect(c.wait(timeout: 180) == 0, "\(c.output)")
        let allowed = CPUAffinity.allowedCPUs()
        let threads = max(1, allowed.count / 3)
        for r in 0..<3 {
            #expect(c.output.contains("join: open-mpi: rank \(r) of 3 (local rank \(r) of 3), coordinator 127.0.0.1:\(port); "
                                      + "\(threads) compute thread(s) (\(allowed.count) allowed CPU(s) / 3 local processes)"), "\(c.output)")
        }
        let bound = c.output.split(separator: "\n").filter { $0.hasPrefix("join: bound to CPU(s) ") }.map { String($0.dropFirst(22)) }
        let expected = (0..<3).map { CPUAffinity.cpus(forLocalRank: $0, count: threads).sorted().map(String.init).joined(separator: ",") }
        #expect(bound.sorted() == expected.sorted(), "\(c.output)")
        try Self.expectRingBytes(dir + "/metrics.jsonl", workers: 3, steps: 0...(Self.steps - 1))
    }

    /// Brings up SLURM with scripts/slurm-local (root only), runs `srun -n 3 … join`, then the shipped
    /// sbatch script twice: 3 tasks for 2 steps, then a resubmission with 2 tasks and --steps 3 that
    /// resumes from the first one's checkpoint. Stops the daemons at the end.
    @Test func slurmSrunAndTheShippedSbatchScript() throws {
        let script = packageRoot.appendingPathComponent("scripts/slurm-local").path
        let log = FileManager.default.temporaryDirectory.path + "/slurm-local-\(getpid()).log"
        let up = try runToEnd(script, ["up"], log: log)
        // Exit status 2: SLURM cannot run here (not root, daemons that do not start), said on stderr.
        if up.status == 2 { try Test.cancel("skipped: SLURM cannot run here: \(up.output.trimmingCharacters(in: .whitespacesAndNewlines))") }
        try #require(up.status == 0, "scripts/slurm-local up: \(up.output)")
        defer {
            let down = try? runToEnd(script, ["down"], log: log)
            #expect(down?.status == 0, "scripts/slurm-local down: \(down?.output ?? "did not start")")
        }
        let slurm = ["SLURM_CONF": "/tmp/squeezetrain-slurm/slurm.conf"]
        let dir = try temporaryDirectory("join-slurm")
        defer { try? FileManager.default.removeItem(atPath: dir) }

        // srun: every task gets SLURM_PROCID/NTASKS/LOCALID; the host is the first of SLURM_JOB_NODELIST.
        let port = try freeTCPPort()
        let srun = try Child(["-n", "3", "--time=5", "--kill-on-bad-exit=1", squeezetrain, "join"] + Self.options(metrics: dir + "/srun-metrics.jsonl"),
                             log: dir + "/srun.log", executable: "/usr/bin/srun",
                             environment: Self.noLauncher.merging(slurm.merging(["MASTER_PORT": "\(port)"]) { $1 }) { $1 })
        #expect(srun.wait(timeout: 180) == 0, "\(srun.output)")
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? ""
        for r in 0..<3 { #expect(srun.output.contains("join: slurm: rank \(r) of 3 (local rank \(r) of 3), coordinator \(host):\(port)"), "\(srun.output)") }
        try Self.expectRingBytes(dir + "/srun-metrics.jsonl", workers: 3, steps: 0...(Self.steps - 1))

        // The shipped script, as a user submits it (command-line options override its #SBATCH lines).
        let sbatchScript = packageRoot.appendingPathComponent("cluster/slurm/train.sbatch").path
        func sbatch(tasks: Int, steps: Int, name: String) throws -> (status: Int32, output: String) {
            let c = try Child(["--wait", "--nodes=1", "--ntasks=\(tasks)", "--ntasks-per-node=\(tasks)", "--cpus-per-task=1", "--time=5",
                               "--output=\(dir)/\(name).out", sbatchScript] + Self.options(metrics: dir + "/sbatch-metrics.jsonl", steps: steps),
                              log: dir + "/\(name).log", executable: "/usr/bin/sbatch",
                              environment: Self.noLauncher.merging(slurm.merging(["SQUEEZETRAIN": squeezetrain, "CHECKPOINT_DIR": dir + "/checkpoints"]) { $1 }) { $1 })
            let status = c.wait(timeout: 240)
            let output = c.output + ((try? String(contentsOfFile: "\(dir)/\(name).out", encoding: .utf8)) ?? "(no \(name).out)")
            return (status, output)
        }
        let first = try sbatch(tasks: 3, steps: 2, name: "first")
        #expect(first.status == 0, "\(first.output)")
        #expect(first.output.contains("join: slurm: rank 2 of 3"), "\(first.output)")
        try Self.expectRingBytes(dir + "/sbatch-metrics.jsonl", workers: 3, steps: 0...1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/checkpoints").contains { $0.hasPrefix("checkpoint-") },
                "a checkpoint at the end of the run")

        // Resubmitted with 2 tasks and a longer run: continues at step 2 (the script always passes --resume).
        let second = try sbatch(tasks: 2, steps: 3, name: "second")
        #expect(second.status == 0, "\(second.output)")
        #expect(second.output.contains("resuming from") && second.output.contains("at step 2"), "\(second.output)")
        let resumed = try readMetrics(dir + "/sbatch-metrics.jsonl").filter { $0["world_size"] as? Int == 2 }
        #expect(resumed.map { $0["step"] as? Int } == [2, 2], "the resumed job trains step 2 only, on 2 ranks")
    }

    /// No Kubernetes runs here: cluster/kubernetes/validate checks the manifests against the API schemas
    /// (PyPI's kubernetes-validate, strict) and that they set what join reads.
    @Test func kubernetesManifestsValidateOffline() throws {
        let dir = try temporaryDirectory("join-kube")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try runToEnd(packageRoot.appendingPathComponent("cluster/kubernetes/validate").path, [], log: dir + "/validate.log")
        if r.status == 2 { try Test.cancel("skipped: \(r.output.trimmingCharacters(in: .whitespacesAndNewlines))") }
        #expect(r.status == 0, "\(r.output)")
        for check in ["schemas (strict)", "RANK is the pod's completion index: yes", "MASTER_ADDR is pod 0's name: yes",
                      "SQUEEZETRAIN_KEY_FILE is inside the mounted Secret: yes", "checkpoints on the shared volume, with --resume: yes"] {
            #expect(r.output.contains(check), "\(r.output)")
        }
    }

    /// No container engine runs here: cluster/check-runtime-libs checks that the runtime stage of
    /// cluster/Containerfile installs every library the executable names.
    @Test func containerRuntimeStageHasTheLibrariesTheExecutableNeeds() throws {
        let dir = try temporaryDirectory("join-libs")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try runToEnd(packageRoot.appendingPathComponent("cluster/check-runtime-libs").path, [squeezetrain], log: dir + "/libs.log")
        if r.status == 2 { try Test.cancel("skipped: \(r.output.trimmingCharacters(in: .whitespacesAndNewlines))") }
        #expect(r.status == 0, "\(r.output)")
        for lib in ["libzmq.so.5: libzmq5", "libdnnl.so.2: libdnnl2", "libcrypto.so.3: libssl3", "libgomp.so.1: libgomp1"] { #expect(r.output.contains(lib), "\(r.output)") }
    }

    /// What `join` says when the environment does not describe a job, through the binary.
    @Test func badEnvironmentsAreRefusedNamingTheVariables() throws {
        let dir = try temporaryDirectory("join-env")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func join(_ env: [String: String], _ extra: [String] = []) throws -> (Int32, String) {
            let c = try Child(["join", "--steps", "1", "--batch-size", "24"] + extra, log: dir + "/\(UUID().uuidString).log",
                              environment: Self.noLauncher.merging(env) { $1 })
            return (c.wait(timeout: 30), c.output)
        }
        let none = try join([:])
        #expect(none.0 == 1 && none.1.contains("no launcher environment found") && none.1.contains("SLURM_PROCID"), "\(none.1)")
        let partial = try join(["RANK": "1", "MASTER_ADDR": "127.0.0.1"])
        #expect(partial.0 == 1 && partial.1.contains("RANK is set but WORLD_SIZE is not"), "\(partial.1)")
        let contradictory = try join(["OMPI_COMM_WORLD_RANK": "1", "PMIX_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "MASTER_ADDR": "h"])
        #expect(contradictory.0 == 1 && contradictory.1.contains("OMPI_COMM_WORLD_RANK=1 and PMIX_RANK=2 contradict"), "\(contradictory.1)")
        let noHost = try join(["OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"])
        #expect(noHost.0 == 1 && noHost.1.contains("MASTER_ADDR"), "\(noHost.1)")
        let batch = try join(["RANK": "1", "WORLD_SIZE": "5", "MASTER_ADDR": "h"])
        #expect(batch.0 == 1 && batch.1.contains("--batch-size 24") && batch.1.contains("5 processes"), "\(batch.1)")
        // Rank 0 would wait where nobody looks: MASTER_ADDR (TEST-NET-1) is not this machine.
        let elsewhere = try join(["RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "192.0.2.1"])
        #expect(elsewhere.0 == 1 && elsewhere.1.contains("192.0.2.1, which is not an address of this machine"), "\(elsewhere.1)")
        let flag = try join(["RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "h"], ["--rank", "3"])
        #expect(flag.0 == 1 && flag.1.contains("with the flags applied gives rank 3"), "\(flag.1)")
    }
}

/// Runs `executable` to its end, output to `log`, with no signal blocked and SIGINT/SIGTERM/SIGHUP at
/// their defaults. For scripts that start daemons (scripts/slurm-local): Foundation's `Process`
/// passes on the signals the test runner blocks (the daemons then never see `down`'s SIGTERM),
/// and waits for every descendant holding its notification socket, which a daemon keeps.
func runToEnd(_ executable: String, _ arguments: [String], log: String) throws -> (status: Int32, output: String) {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var none = sigset_t(), defaults = sigset_t()
    sigemptyset(&none)
    sigemptyset(&defaults)
    for sig in [SIGINT, SIGTERM, SIGHUP, SIGPIPE] { sigaddset(&defaults, sig) }
    posix_spawnattr_setsigmask(&attributes, &none)
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp = ProcessInfo.processInfo.environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { (argv + envp).forEach { free($0) } }
    var pid = pid_t()
    let rc = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
    guard rc == 0 else { throw TestFailure("posix_spawn \(executable): \(String(cString: strerror(rc)))") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    return (status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f), output)
}
