import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

/// The executable itself, for spawning helper processes.
func selfExecutable() -> String {
    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
}

struct BenchAllReduce: ReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "allreduce",
        abstract: "Time one all-reduce (average) of F floats between N worker processes on this machine.",
        discussion: """
        Bus bandwidth is 2(N−1)/N × bytes / time, in GB/s (10⁹ bytes per second), as NCCL's and \
        gloo's benchmarks report it. The time is the median over --iterations on rank 0.
        """)

    @Option(help: "Worker processes.") var workers = 2
    @Option(help: "Floats per all-reduce (727,626 = SqueezeNet 1.1 on CIFAR-10; 57,044,810 = AlexNet).") var floats = 727_626
    @Option(help: "ring, star (through a hub process, as the coordinator would be) or tree (binary, rooted at rank 0).") var algorithm: AllReduceAlgorithm = .ring
    @Option(help: "ipc (the default, as launch's: sockets in the private directory only you can enter, nothing sealed) or tcp (127.0.0.1; every frame sealed with AES-256-GCM under a fresh run key).")
    var transport: DataTransportKind = .ipc
    @Option(help: "Timed all-reduces (the median is reported).") var iterations = 50
    @Option(help: "Untimed warm-up all-reduces.") var warmup = 5
    @Option(help: "Pipelining chunk in KiB (the cluster uses 1024).") var chunkKb = 1024
    @Option(help: "Gradient compression on the wire: none, fp16, bf16, int8 or topk:F.") var compress: GradientCompression = .none
    @Option(help: "core: bind participant r (and its I/O thread) to the r-th allowed CPU, round-robin, as mpirun --bind-to core does; none: leave placement to the scheduler.")
    var bindTo: WorkerBinding = .core
    @Flag(help: "Measure plain sockets instead of the default: a fresh run key, every tcp frame sealed with AES-256-GCM (ipc sockets live in a directory only you can enter and are not sealed either way).")
    var insecure = false
    @Flag(help: "Print a JSON object.") var json = false
    /// The data plane before it was sealed: CURVE on every socket (to compare against).
    @Flag(help: .hidden) var curveDataPlane = false

    // Internal: one participant (spawned by the command above).
    @Option(help: .hidden) var rank: Int?
    @Option(help: .hidden) var endpoints: String?
    @Option(help: .hidden) var keyFile: String?
    @Option(help: .hidden) var salt: String?

    struct Report: Codable {
        var workers: Int, floats: Int, algorithm: String, transport: String, compress: String, bindTo: String, iterations: Int
        var encrypted: Bool
        /// curve, aes-gcm or none (`DataProtection`).
        var protection: String
        /// AES-256-GCM's speed on one core of this machine, GB/s (OpenSSL, 1 MiB frames); set by the spawner.
        var sealGbps: Double?
        var secondsPerAllreduce: Double, secondsPerAllreduceMin: Double
        var busBandwidthGbps: Double
        var bytesSentPerWorker: Int, bytesReceivedPerWorker: Int
    }

    func validate() throws {
        guard workers >= 1, floats >= 1, iterations >= 1, warmup >= 0 else {
            throw ValidationError("--workers, --floats and --iterations must be at least 1")
        }
        try validateAlgorithm(algorithm, compress: compress)
    }

    /// What protects the frames: nothing with --insecure, CURVE if asked, else what a run's data plane gets.
    var protection: DataProtection {
        if insecure { return .none }
        return curveDataPlane ? .curve : DataProtection(keyed: true, kind: transport)
    }

    func execute() throws {
        if let rank, let endpoints { return try participate(rank: rank, endpoints: endpoints.split(separator: ",").map(String.init)) }
        var report = try launch()
        report.sealGbps = try sealThroughput() / 1e9
        if json { return try printJSON(report) }
        let shielded = ["curve": " (CURVE-encrypted)", "aes-gcm": " (frames sealed with AES-256-GCM)"][report.protection]
            ?? (transport == .ipc ? " (private directory, nothing sealed)" : " (plain)")
        print("\(report.algorithm) all-reduce of \(grouped(floats)) floats (\(humanBytes(Double(4 * floats)))), \(workers) worker processes, \(transport.rawValue)"
              + shielded + ", bound to \(bindTo == .core ? "cores" : "no core")"
              + (compress == .none ? ":" : ", --compress \(compress) (bus bandwidth counts float32 bytes):"))
        print(String(format: "  %.3f ms per all-reduce (median of %d; best %.3f ms), bus bandwidth %.2f GB/s",
                     report.secondsPerAllreduce * 1e3, iterations, report.secondsPerAllreduceMin * 1e3, report.busBandwidthGbps))
        // Rank 0's counters: every worker's with ring and star, the root's (the most) with the tree.
        print("  bytes sent by rank 0 per all-reduce: \(grouped(report.bytesSentPerWorker)), received: \(grouped(report.bytesReceivedPerWorker))")
        print(String(format: "  AES-256-GCM (OpenSSL) on one core of this machine: %.2f GB/s (1 MiB frames)", report.sealGbps ?? 0))
    }

    /// Spawns the participants (N workers, plus a hub for star) and returns rank 0's report.
    private func launch() throws -> Report {
        let group = algorithm.groupSize(workers: workers)
        let endpoints = try (0..<group).map { r -> String in
            transport == .ipc ? try ipcEndpoint("bench-\(r)")
                               : "tcp://127.0.0.1:\(try freeTCPPort())"
        }
        let run = try RunDirectory(prefix: "squeezetrain-bench-")
        defer { run.remove() }
        let key = insecure ? nil : try run.makeKey()
        let salt = DataPlaneSeal.hex(try DataPlaneSeal.randomSalt())  // as a coordinator draws one per rendezvous
        var children = [(Process, Pipe)]()
        for r in 0..<group {
            let p = Process(), out = Pipe()
            p.executableURL = URL(fileURLWithPath: selfExecutable())
            p.arguments = ["bench", "allreduce", "--workers", "\(workers)", "--floats", "\(floats)", "--algorithm", algorithm.rawValue,
                           "--transport", transport.rawValue, "--iterations", "\(iterations)", "--warmup", "\(warmup)", "--chunk-kb", "\(chunkKb)",
                           "--compress", compress.description, "--bind-to", bindTo.rawValue,
                           "--rank", "\(r)", "--endpoints", endpoints.joined(separator: ",")]
                + (key.map { ["--key-file", $0, "--salt", salt] } ?? ["--insecure"]) + (curveDataPlane ? ["--curve-data-plane"] : [])
            p.standardOutput = out
            try p.run()
            children.append((p, out))
        }
        var report: Report?
        for (r, (p, out)) in children.enumerated() {
            let data = out.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            guard p.terminationStatus == 0 else { throw ClusterError("bench participant \(r) exited with status \(p.terminationStatus)") }
            if r == 0 {
                let decoder = JSONDecoder()
                decoder.keyDecodingStrategy = .convertFromSnakeCase
                report = try decoder.decode(Report.self, from: data)
            }
        }
        guard let report else { throw ClusterError("bench participant 0 wrote no report") }
        return report
    }

    private func participate(rank: Int, endpoints: [String]) throws {
        let group = endpoints.count
        // Before libzmq starts its I/O thread, which inherits the binding.
        if bindTo == .core { try CPUAffinity.bindCurrentThread(to: CPUAffinity.cpus(forLocalRank: rank)) }
        // The spawner passes the run's key or --insecure: a participant with neither must not run in the clear.
        guard keyFile != nil || insecure else {
            throw ClusterError("bench participant \(rank) has no --key-file and no --insecure: give it the run's key (or --insecure to measure plain sockets)")
        }
        // A keyed ipc data plane goes unsealed only because no other user can reach its sockets.
        if !insecure, transport == .ipc, let outside = endpoints.first(where: { privateIPCProblem($0) != nil }) {
            throw ClusterError("bench participant \(rank): the endpoint \(outside) \(privateIPCProblem(outside)!), and an ipc data plane is not sealed; "
                               + "pass --transport tcp to seal its frames")
        }
        let security: PeerSecurity = try keyFile.map { .curve(try RunKey.read(from: $0)) } ?? .insecure
        let context = try ZMQContext()
        defer { context.terminate() }
        try context.authenticate(security) { emit("\($0)\n") }
        var transportOptions = ZMQTransport.Options()
        switch (protection, security) {
        case (.curve, _): transportOptions.security = security
        case (.aesGCM, .curve(let key)):
            guard let salt = salt.flatMap(DataPlaneSeal.salt(hex:)) else { throw ClusterError("bench participant \(rank) has no valid --salt (64 hex digits)") }
            transportOptions.seal = try DataPlaneSeal(key: key, salt: salt)
        default: transportOptions.security = transport == .ipc ? .privateIPC : .insecure
        }
        let transport = try ZMQTransport(rank: rank, worldSize: group, bind: endpoints[rank], context: context, options: transportOptions)
        defer { transport.close() }
        try transport.connect(topology: algorithm.topology(workers: workers), endpoints: endpoints)
        let options = CollectiveOptions(chunkBytes: chunkKb * 1024, timeout: .seconds(60))
        if algorithm == .star && rank == workers {
            _ = try CommBenchmark.hubSeconds(StarAllReduceHub(transport: transport, options: options, compression: compress), floats: floats,
                                             iterations: iterations, warmup: warmup)
            return
        }
        let reducer = makeAllReducer(transport, algorithm: algorithm, hub: workers, options: options, compression: compress)
        let before = transport.counters
        let times = try CommBenchmark.allReduceSeconds(reducer, floats: floats, iterations: iterations, warmup: warmup)
        let rounds = iterations + warmup
        let sent = (transport.counters.payloadBytesSent - before.payloadBytesSent) / rounds
        let received = (transport.counters.payloadBytesReceived - before.payloadBytesReceived) / rounds
        let median = CommBenchmark.median(times)
        let bus = workers > 1 ? 2 * Double(workers - 1) / Double(workers) * Double(4 * floats) / median / 1e9 : 0
        let report = Report(workers: workers, floats: floats, algorithm: algorithm.rawValue, transport: self.transport.rawValue, compress: compress.description, bindTo: bindTo.rawValue,
                            iterations: iterations, encrypted: protection != .none, protection: protection.rawValue,
                            secondsPerAllreduce: median, secondsPerAllreduceMin: times.min()!,
                            busBandwidthGbps: bus, bytesSentPerWorker: sent, bytesReceivedPerWorker: received)
        if rank == 0 {
            let encoder = JSONEncoder()
            encoder.keyEncodingStrategy = .convertToSnakeCase
            FileHandle.standardOutput.write(try encoder.encode(report))
        }
    }
}

struct BenchClusterCommand: ReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Training throughput of a local cluster (coordinator + N worker processes) on CIFAR-10.",
        discussion: """
        Images/s is the global batch over the median step time (the slowest rank's) after the warm-up steps. \
        With --kill-worker-at STEP the last worker is SIGKILLed once step STEP's lines are written, and the run goes on \
        elastically (--elastic; with --rejoin a new worker joins) or, with --restart-all-every K, every process restarts \
        from the newest checkpoint (as launch --max-restarts): the steps trained twice, the stall from the signal to the \
        next step written, and the time a new worker takes to train are printed.
        """)

    @Option(help: "Worker processes.") var workers = 2
    @Option(help: "Global batch per step.") var batchSize = 128
    @Option(help: "Compute threads per worker.") var threads = 1
    @Option(help: "core or none, as for launch.") var bindTo: WorkerBinding = .none
    @Option(help: "Timed steps.") var steps = 30
    @Option(help: "Untimed warm-up steps.") var warmup = 5
    @OptionGroup var model: ModelOptions
    @OptionGroup var communication: ClusterOptions
    @Option(help: "CIFAR-10 directory.") var data: String?
    @Flag(help: "Measure plain sockets instead of the default: a fresh run key, CURVE on the control plane, every tcp data-plane frame sealed with AES-256-GCM.")
    var insecure = false
    @Flag(help: "Print a JSON object.") var json = false
    @Option(help: "SIGKILL the last worker once step STEP (0-based, warm-up included) is written, and report what it cost.")
    var killWorkerAt: Int?
    @Flag(help: "With --kill-worker-at (elastic): start a new worker in its place, which joins the running run.")
    var rejoin = false
    @Option(help: ArgumentHelp("With --kill-worker-at: instead of going on elastically, restart every process from the newest checkpoint, written every K steps (launch --max-restarts 1).", valueName: "K"))
    var restartAllEvery: Int?

    struct Report: Encodable {
        var workers: Int, batchSize: Int, threadsPerWorker: Int, model: String, allreduce: String, steps: Int, encrypted: Bool
        /// The data plane's: aes-gcm (tcp with the run key), none (--insecure, or ipc).
        var protection: String
        var imagesPerSecond: Double, secondsPerStepMedian: Double
        var bytesSentPerWorkerPerStep: Double, bytesReceivedPerWorkerPerStep: Double, theoryBytesSentPerWorkerPerStep: Double
        var allreduceShareOfStep: Double
        /// --kill-worker-at: what the kill cost.
        var kill: KillFigures?
    }

    func validate() throws {
        guard workers >= 1, batchSize % workers == 0 else { throw ValidationError("--batch-size must divide evenly over --workers") }
        guard steps >= 1, warmup >= 0 else { throw ValidationError("--steps must be at least 1") }
        if let killWorkerAt {
            guard workers >= 2 else { throw ValidationError("--kill-worker-at needs --workers 2 or more: someone must go on") }
            guard (0..<(warmup + steps - 1)).contains(killWorkerAt) else {
                throw ValidationError("--kill-worker-at \(killWorkerAt) must be a step before the last, 0..<\(warmup + steps - 1)")
            }
            if rejoin && restartAllEvery != nil { throw ValidationError("--rejoin is for the elastic run; --restart-all-every restarts every process anyway") }
            if let k = restartAllEvery, k < 1 { throw ValidationError("--restart-all-every must be at least 1 step") }
        } else if rejoin || restartAllEvery != nil {
            throw ValidationError("--rejoin and --restart-all-every go with --kill-worker-at STEP")
        }
    }

    func execute() throws {
        let run = try RunDirectory(prefix: "squeezetrain-bench-cluster-")
        defer { run.remove() }
        let access = PeerAccess(keyFile: insecure ? nil : try run.makeKey(), insecure: insecure)
        let metrics = run.path + "/metrics.jsonl"
        let log = LogBuffer()
        let watcher = killWorkerAt.map { KillWatcher(metrics: metrics, killAt: $0, rejoin: rejoin) }
        // With a kill and --restart-all-every: attempts as launch --max-restarts 1 makes them; else one.
        let supervisor = RestartSupervisor(maxRestarts: restartAllEvery == nil ? 0 : 1, metricsPath: metrics, log: { log.add($0) })
        let outcome = try supervisor.run { attempt in
            let group = ProcessGroup(try specs(resume: attempt > 0, access: access, metrics: metrics, in: run), write: { line in
                log.add(line)
                if line.hasPrefix("[launch] started joiner") { watcher?.joinerStarted() }
            }, onEvent: { supervisor.handle($1) })
            if killWorkerAt != nil && restartAllEvery == nil {
                group.survivable = Set((0..<workers).map { "worker \($0)" })
                group.replacements = rejoin ? 1 : 0
            }
            supervisor.started(group)
            try group.start()
            if attempt == 0, let watcher, let victim = group.pid(of: "worker \(workers - 1)") { watcher.start(killing: victim) }
            return group.wait(primary: "coordinator")
        }
        let kill = watcher?.result()
        guard outcome == .success else { throw ClusterError("\(outcome)\n" + log.text) }
        var report = try summarise(metrics)
        report.kill = kill
        if json { return try printJSON(report) }
        defer { if let killWorkerAt { printKill(kill, at: killWorkerAt) } }
        print("\(workers) workers × \(threads) thread(s), global batch \(batchSize), \(report.model), \(report.allreduce) all-reduce"
              + (insecure ? ", plain sockets:" : ", CURVE control plane, data plane \(communication.dataTransport.rawValue) "
                 + (report.protection == "aes-gcm" ? "sealed with AES-256-GCM:" : "not sealed (private ipc):")))
        print(String(format: "  %.0f images/s (median step %.1f ms over %d steps)", report.imagesPerSecond,
                     report.secondsPerStepMedian * 1e3, steps))
        print(String(format: "  sent per worker per step %@ (theory %@), received %@; all-reduce busy %.0f%% of the step",
                     megabytes(report.bytesSentPerWorkerPerStep), megabytes(report.theoryBytesSentPerWorkerPerStep),
                     megabytes(report.bytesReceivedPerWorkerPerStep), 100 * report.allreduceShareOfStep))
    }

    /// The processes of the run (attempt > 0 of --restart-all-every: resumed from the newest checkpoint).
    private func specs(resume: Bool, access: PeerAccess, metrics: String, in run: RunDirectory) throws -> [ProcessSpec] {
        let endpoint = "tcp://127.0.0.1:\(try freeTCPPort())"
        var training = try TrainingOptions.parse([])
        (training.model, training.data, training.batchSize, training.steps) = (model, data, batchSize, warmup + steps)
        var comm = communication
        comm.noEval = true  // a throughput benchmark: no test-set evaluation at the end
        if killWorkerAt != nil, let every = restartAllEvery {
            comm.checkpoints.checkpointDir = run.path + "/checkpoints"
            comm.checkpoints.checkpointEvery = every
            comm.checkpoints.resume = resume
        } else if killWorkerAt != nil {
            comm.elastic = true
        }
        let coordinator = CoordinatorProcess(options: coordinatorOptions(bind: endpoint, workers: workers, training: training, cluster: comm,
                                                                         metrics: metrics, initWeights: nil, saveWeights: nil),
                                             access: access, traceWindow: TraceOptions.defaultWindow)
        var specs = [try run.spec("coordinator", coordinator, ["coordinator", "--bind", endpoint, "--workers", "\(workers)", "--events"])]
        for r in 0..<workers {
            let worker = WorkerProcess(coordinator: endpoint, options: workerOptions(threads: threads, data: data, rank: r, joinTimeout: 120, trace: nil,
                                                                                     window: TraceOptions.defaultWindow),
                                       access: access, cpus: bindTo.cpus(rank: r, threads: threads))
            specs.append(try run.spec("worker \(r)", worker, ["worker", "--coordinator", endpoint, "--rank", "\(r)"]))
        }
        return specs
    }

    private func printKill(_ kill: KillFigures?, at step: Int) {
        let how = restartAllEvery.map { "every process restarted from the newest checkpoint (written every \($0) steps)" }
            ?? "the others went on (--elastic)" + (rejoin ? ", and a new worker joined" : "")
        guard let kill else { return print("  worker \(workers - 1) SIGKILLed at step \(step): no change of members or restart was seen") }
        print("  worker \(workers - 1) SIGKILLed once step \(kill.killedAfterStep) was written; \(how):")
        print("    steps trained again: \(kill.stepsRedone) (the run went on from step \(kill.resumedFromStep))")
        print(String(format: "    stall, SIGKILL → next step written: %.2f s", kill.stallSeconds))
        if let seconds = kill.joinerSeconds { print(String(format: "    new worker, started → its first step written: %.2f s", seconds)) }
    }

    private func summarise(_ path: String) throws -> Report {
        let text = String(decoding: try readFileNoFollow(path), as: UTF8.self)  // a private directory: no link is followed
        let lines = try text.split(separator: "\n").compactMap {
            try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]
        }.filter { $0["rank"] != nil && ($0["step"] as? Int ?? 0) >= warmup }  // per-worker lines (not a membership or restart event)
        func number(_ l: [String: Any], _ k: String) -> Double { (l[k] as? NSNumber)?.doubleValue ?? 0 }
        let bySteps = Dictionary(grouping: lines) { $0["step"] as? Int ?? 0 }
        let stepTimes = bySteps.values.map { $0.map { number($0, "step_seconds") }.max() ?? 0 }.sorted()
        let median = stepTimes[stepTimes.count / 2]
        let n = Double(lines.count)
        func mean(_ k: String) -> Double { lines.reduce(0) { $0 + number($1, k) } / n }
        return Report(workers: workers, batchSize: batchSize, threadsPerWorker: threads, model: model.config.architecture.rawValue,
                      allreduce: communication.allreduce.rawValue, steps: bySteps.count, encrypted: !insecure,
                      protection: (insecure ? .none : DataProtection(keyed: true, kind: communication.dataTransport)).rawValue,
                      imagesPerSecond: Double(batchSize) / median, secondsPerStepMedian: median,
                      bytesSentPerWorkerPerStep: mean("allreduce_bytes_sent"), bytesReceivedPerWorkerPerStep: mean("allreduce_bytes_received"),
                      // The mean over the lines like the bytes (ring and star lines carry one figure, the tree's differ by rank).
                      theoryBytesSentPerWorkerPerStep: mean("theory_bytes_sent"),
                      allreduceShareOfStep: lines.reduce(0) { $0 + number($1, "allreduce_seconds") } / max(lines.reduce(0) { $0 + number($1, "step_seconds") }, 1e-9))
    }
}

/// Keeps the lines of a quiet process group, to show them if it fails.
final class LogBuffer: @unchecked Sendable {
    // @unchecked Sendable: `lock` guards `text`.
    private let lock = NSLock()
    private var lines = [String]()
    func add(_ s: String) { lock.withLock { lines.append(s); if lines.count > 200 { lines.removeFirst() } } }
    var text: String { lock.withLock { lines.joined() } }
}
