import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

extension AllReduceAlgorithm: ExpressibleByArgument {}

/// `--compress` parses, and the all-reduce takes it (the tree refuses topk).
func validateAlgorithm(_ algorithm: AllReduceAlgorithm, compress: String) throws {
    let compression: GradientCompression
    do { compression = try GradientCompression(parsing: compress) } catch { throw ValidationError("--compress: \(error)") }
    if let refusal = algorithm.refusal(compression) { throw ValidationError(refusal) }
}

/// Options of a cluster run beyond the training itself, shared by `coordinator`, `launch` and the benchmarks.
struct ClusterOptions: ParsableArguments {
    @Option(help: "All-reduce: ring (reduce-scatter + all-gather between workers), star (through the coordinator) or tree (partial sums up a binary tree of workers rooted at rank 0, the average down; not with --compress topk).")
    var allreduce: AllReduceAlgorithm = .ring
    @Option(help: "Gradient compression on the wire: none, fp16, bf16, int8 (per-chunk scale, error feedback) or topk:F (the fraction F of largest entries, error feedback).")
    var compress = "none"
    @Option(help: "Gradient bucket size in MB (buckets start as soon as backward has finished them).")
    var bucketMb: Double = 1
    @Option(help: ArgumentHelp("Data-plane transport between workers: tcp (frames sealed with AES-256-GCM under the run key) or ipc (same machine only, "
                               + "sockets in a directory only you can enter, nothing sealed). Default: tcp; launch: ipc, the control plane too.",
                               valueName: "transport"))
    var transport: String?
    /// The data plane's transport: `--transport`, else tcp (launch has its own default, ipc).
    var dataTransport: String { transport ?? "tcp" }
    @Option(help: "Seconds of silence after which a worker counts as lost (workers heartbeat 4 times per timeout).")
    var timeout: Double = 10
    @Option(help: "Seconds to wait for all workers to join.")
    var joinTimeout: Double = 120
    @Flag(help: "Skip the test-set evaluation at each epoch end (otherwise every worker evaluates 1/N of it).")
    var noEval = false
    @OptionGroup var checkpoints: CheckpointOptions
    @OptionGroup var precision: PrecisionOption

    func validate() throws {
        guard ["tcp", "ipc"].contains(dataTransport) else { throw ValidationError("--transport must be tcp or ipc (got \(dataTransport))") }
        guard bucketMb.isFinite, bucketMb >= 0.001, bucketMb <= 4096 else { throw ValidationError("--bucket-mb must be in 0.001...4096 (got \(bucketMb))") }
        try validateAlgorithm(allreduce, compress: compress)
        guard timeout.isFinite, timeout >= 0.1, timeout <= 3600 else { throw ValidationError("--timeout must be in 0.1...3600 seconds (got \(timeout))") }
        guard joinTimeout.isFinite, joinTimeout >= 0.1, joinTimeout <= 86_400 else {
            throw ValidationError("--join-timeout must be in 0.1...86400 seconds (got \(joinTimeout))")
        }
    }
}

struct CoordinatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "coordinator",
        abstract: "Own a cluster run: wait for the workers, assign ranks, collect metrics, detect failures.")

    @Option(help: "Control endpoint to bind, e.g. tcp://0.0.0.0:29500 (workers connect here).")
    var bind: String
    @Option(help: "Number of workers.")
    var workers: Int
    @OptionGroup var training: TrainingOptions
    @OptionGroup var communication: ClusterOptions
    @Option(help: "Write JSON lines here: one per worker per step.")
    var metrics: String?
    @Option(help: "Initial weights (safetensors) for every worker, instead of the seed (a path every worker can read).")
    var initWeights: String?
    @Option(help: "Rank 0 writes the final weights here (safetensors, torchvision names).")
    var saveWeights: String?
    @OptionGroup var security: SecurityOptions
    @OptionGroup(title: "Timeline (the star hub's track; a ring's gradients never pass the coordinator)") var tracing: TraceOptions
    @Flag(help: .hidden) var events = false  // ClusterEvent lines on standard output (for launch)

    func validate() throws {
        do { _ = try Endpoint(bind, flag: "--bind") } catch { throw ValidationError(error.description) }
        try requireRange("--workers", workers, 1...1024)
        guard training.batchSize % workers == 0 else {
            throw ValidationError("--batch-size \(training.batchSize) is the global batch; it must divide evenly over --workers \(workers)")
        }
        try tracing.requireStarHub(communication.allreduce)
    }

    func run() throws {
        ProcessGroup.endWithLauncher()
        do {
            let summary = try runCoordinator(bind: bind, workers: workers, training: training, communication: communication,
                                             security: try security.security(endpoint: bind, transport: communication.dataTransport),
                                             metrics: metrics, initWeights: initWeights, saveWeights: saveWeights,
                                             tracer: tracing.tracer(pid: workers, processName: "star hub (coordinator)"),
                                             events: eventWriter(events), log: { emit("\($0)\n") })
            try endRun(summary, workers: workers, resume: communication.checkpoints.checkpointDir != nil ? "--resume" : nil)
        } catch let e as ExitCode {
            throw e
        } catch let e as Interrupted {
            throw stoppedBeforeTraining(e)
        } catch {
            throw fail(String(describing: error))
        }
    }
}

/// Runs a coordinator bound to `bind` until the run ends. `stop` is the caller's when it already takes
/// the signals (`join`), else SIGINT/SIGTERM are taken here; `hubHost` is the address the star hub's
/// data plane binds (default: the local address on the route to the bound endpoint).
func runCoordinator(bind: String, workers: Int, training: TrainingOptions, communication: ClusterOptions,
                    security: PeerSecurity, metrics: String?, initWeights: String? = nil, saveWeights: String? = nil, quiet: Bool = false,
                    tracer: Tracer? = nil, stop: StopToken? = nil, hubHost: (@Sendable () throws -> String)? = nil,
                    events: @escaping (ClusterEvent) -> Void = { _ in }, log: @escaping (String) -> Void) throws -> ClusterSummary {
    let stop = stop ?? stopOnSignals()
    let records = trainingRecordCount(training.data)
    var config = training.config(trainingRecords: records, workers: workers)
    config.precision = communication.precision.precision == .fp32 ? nil : communication.precision.precision  // each worker checks its CPU
    var options = CoordinatorOptions(bind: bind, workers: workers, config: config)
    options.trainingRecords = records
    options.algorithm = communication.allreduce
    options.compression = try GradientCompression(parsing: communication.compress)
    options.bucketBytes = Int(communication.bucketMb * 1_048_576)
    options.transport = DataTransportKind(rawValue: communication.dataTransport)!  // validated
    options.timeout = .milliseconds(Int(communication.timeout * 1000))
    options.joinTimeout = .milliseconds(Int(communication.joinTimeout * 1000))
    options.metricsPath = metrics
    options.evaluate = !communication.noEval
    options.checkpointDirectory = communication.checkpoints.checkpointDir.map(absolutePath)
    options.checkpointEvery = communication.checkpoints.checkpointEvery
    options.keepCheckpoints = communication.checkpoints.keepCheckpoints
    options.resume = communication.checkpoints.resume
    options.startOver = communication.checkpoints.startOver
    options.initWeights = initWeights.map(absolutePath)
    options.saveWeights = saveWeights.map(absolutePath)
    options.quiet = quiet
    options.tracer = tracer
    defer { writeTrace(tracer) }  // after the hub's thread has ended, also after a failure
    raiseDescriptorLimit()
    let context = try ZMQContext()
    defer { context.terminate() }
    try authenticate(context, security)
    let server = try ZMQControlServer(context: context, bind: bind, security: security, log: log)
    defer { server.close() }
    let endpoint = server.endpoint
    var transportOptions = ZMQTransport.Options()
    transportOptions.security = security
    let dataPlane = ZMQDataPlane(context: context, host: hubHost ?? { try localAddress(towards: endpoint) }, options: transportOptions,
                                 hubRank: workers)
    return try Coordinator(options: options, channel: server, dataPlane: dataPlane, stop: stop, events: events, log: log).run()
}

/// Training records in the data directory (from file sizes), or CIFAR-10's 50,000 when it cannot be found here.
func trainingRecordCount(_ data: String?) -> Int {
    guard let dir = try? CIFAR10.resolveDirectory(explicit: data) else { return 50_000 }
    let bytes = CIFAR10.Split.train.fileNames.reduce(0) { total, name in
        let size = (try? FileManager.default.attributesOfItem(atPath: (dir as NSString).appendingPathComponent(name))[.size] as? Int) ?? 0
        return total + size
    }
    return bytes > 0 ? bytes / CIFAR10.recordSize : 50_000
}

func printSummary(_ s: ClusterSummary, workers: Int) {
    print(String(format: "\n%d steps in %.1f s, %.0f images/s", s.steps, s.seconds, s.imagesPerSecond)
          + (s.testAccuracy.map { String(format: ", test accuracy %.2f%%", 100 * $0) } ?? ""))
    print(pad("rank", 6) + pad("sent/step", 14, right: true) + pad("received/step", 15, right: true) + pad("theory/step", 14, right: true)
          + pad("ratio", 8, right: true) + pad("control/step", 14, right: true) + pad("comm share", 12, right: true))
    var totalSent = 0, totalReceived = 0
    for (rank, t) in s.perRank.enumerated() {
        let steps = Double(max(t.steps, 1))
        let sent = Double(t.bytesSent) / steps
        let theory = s.theoryBytesPerRank[rank]
        totalSent += t.bytesSent; totalReceived += t.bytesReceived
        print(pad("\(rank)", 6) + pad(megabytes(sent), 14, right: true) + pad(megabytes(Double(t.bytesReceived) / steps), 15, right: true)
              + pad(megabytes(theory), 14, right: true) + pad(theory > 0 ? String(format: "%.4f", sent / theory) : "-", 8, right: true)
              + pad(String(format: "%.0f B", Double(t.controlBytes) / steps), 14, right: true)
              + pad(String(format: "%.1f%%", 100 * t.allreduceSeconds / max(t.stepSeconds, 1e-9)), 12, right: true))
    }
    print("total all-reduce payload: \(grouped(totalSent)) bytes sent, \(grouped(totalReceived)) received by the workers"
          + (s.hubBytesReceived > 0 ? "; the coordinator (star hub) received \(grouped(s.hubBytesReceived)) and sent \(grouped(s.hubBytesSent))" : ""))
    print("comm share: all-reduce time as a share of step time (overlapping backward, so it can exceed what it costs)")
}


struct WorkerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker",
        abstract: "Join a coordinator, train on this worker's shard, all-reduce gradients with the others.")

    @Option(help: "The coordinator's control endpoint, e.g. tcp://10.0.0.1:29500.")
    var coordinator: String
    @Option(help: "Compute threads for this worker.")
    var threads = 1
    @Option(help: "CIFAR-10 directory on this machine.")
    var data: String?
    @Option(help: "Ask for this rank (any free rank if taken or omitted).")
    var rank: Int?
    @Option(help: "Address other workers use to reach this one (default: the local address on the route to the coordinator).")
    var advertise: String?
    @Option(help: "Seconds to wait for the coordinator.")
    var joinTimeout: Double = 120
    @Option(help: "Run this worker, all its threads, on these CPUs only, e.g. 0-3 or 0,2 (default: wherever the scheduler puts them).")
    var cpus: String?
    @OptionGroup var security: SecurityOptions
    @OptionGroup(title: "Files, with --insecure only (an unauthenticated worker takes no path from the network: each path the coordinator names must be given here too)")
    var files: WorkerFiles
    @OptionGroup(title: "Timeline (this rank's track)") var tracing: TraceOptions
    @Flag(help: .hidden) var events = false  // ClusterEvent lines on standard output (for launch)

    func validate() throws {
        do { _ = try Endpoint(coordinator, flag: "--coordinator") } catch { throw ValidationError(error.description) }
        try requireRange("--threads", threads, 1...256)
        try requireFinite("--join-timeout", joinTimeout, 0.1...86_400)
        if let cpus {
            do { _ = try CPUAffinity.parseList(cpus) } catch { throw ValidationError("--cpus: \(error)") }
        }
        if !security.insecure, let flag = files.given.first {
            throw ValidationError("\(flag) on a worker is for --insecure runs only; with a key the worker uses the coordinator's paths")
        }
    }

    func run() throws {
        ProcessGroup.endWithLauncher()
        // Before any thread starts (compute, loader, libzmq I/O): they inherit the binding.
        if let cpus {
            do { try CPUAffinity.bindCurrentThread(to: try CPUAffinity.parseList(cpus)) } catch { throw fail("--cpus \(cpus): \(error)") }
            emit("bound to CPU(s) \(CPUAffinity.allowedCPUs().map(String.init).joined(separator: ","))\n")
        }
        let signals = stopOnSignals()
        ComputeThreads.set(threads)
        var options = WorkerOptions()
        options.threads = threads; options.data = data; options.rank = rank
        options.joinTimeout = .milliseconds(Int(joinTimeout * 1000))
        options.tracePath = tracing.trace; options.traceWindow = tracing.window
        if security.insecure { options.ownPaths = files.ownPaths }
        do {
            let (advertise, coordinator) = (advertise, coordinator)
            try runWorker(coordinator: coordinator, options: options, dataHost: { try advertise ?? localAddress(towards: coordinator) },
                          security: try self.security.security(endpoint: coordinator), signals: signals, events: eventWriter(events))
        } catch let e as Interrupted {
            throw stoppedBeforeTraining(e)
        } catch {
            throw fail(String(describing: error))
        }
    }
}

/// The paths a worker of an unauthenticated (`--insecure`) run may use: each one the coordinator names
/// must be given here too.
struct WorkerFiles: ParsableArguments {
    @Option(help: ArgumentHelp("The coordinator's --checkpoint-dir.", valueName: "dir")) var checkpointDir: String?
    @Option(help: ArgumentHelp("The coordinator's --init-weights.", valueName: "file")) var initWeights: String?
    @Option(help: ArgumentHelp("The coordinator's --save-weights.", valueName: "file")) var saveWeights: String?

    /// The flags given.
    var given: [String] {
        [("--checkpoint-dir", checkpointDir), ("--init-weights", initWeights), ("--save-weights", saveWeights)].compactMap { $0.1 == nil ? nil : $0.0 }
    }

    var ownPaths: OwnPaths {
        OwnPaths(checkpointDirectory: checkpointDir.map(absolutePath), initWeights: initWeights.map(absolutePath), saveWeights: saveWeights.map(absolutePath))
    }

    /// These flags for a worker process.
    static func arguments(checkpointDir: String?, initWeights: String?, saveWeights: String?) -> [String] {
        [("--checkpoint-dir", checkpointDir), ("--init-weights", initWeights), ("--save-weights", saveWeights)]
            .flatMap { given in given.1.map { [given.0, absolutePath($0)] } ?? [] }
    }
}

/// Prints a finished run's summary; a run that stopped before its last step (a signal to the
/// coordinator: 128 + the signal; a worker's request: 1) ends with a non-zero exit code, and says how
/// to continue (`resume`, e.g. "--resume", when there are checkpoints).
func endRun(_ summary: ClusterSummary, workers: Int, resume: String?) throws {
    printSummary(summary, workers: workers)
    let hint = resume.map { "; continue with \($0)\n" } ?? "\n"
    if let sig = summary.interruptedBy {
        emit("stopped by signal \(sig) after step \(summary.finalStep)" + hint)
        throw ExitCode(128 + sig)
    }
    if let reason = summary.stoppedEarly {
        emit("stopped early after step \(summary.finalStep): \(reason)" + hint)
        throw ExitCode(1)
    }
}

/// A stop before training (a signal while waiting): said plainly, exit 128 + the signal (1 without one).
func stoppedBeforeTraining(_ e: Interrupted) -> ExitCode {
    emit("\(e)\n")
    return ExitCode(e.signal.map { 128 + $0 } ?? 1)
}

/// Runs a worker connected to the control endpoint `coordinator` until the run ends; its data plane
/// binds on `dataHost()` (asked once the worker has its rank).
func runWorker(coordinator: String, options: WorkerOptions, dataHost: @escaping @Sendable () throws -> String,
               security: PeerSecurity, signals: StopToken, events: @escaping (ClusterEvent) -> Void = { _ in }) throws {
    raiseDescriptorLimit()
    let context = try ZMQContext()
    defer { context.terminate() }
    try authenticate(context, security)
    var transportOptions = ZMQTransport.Options()
    transportOptions.abandonTimeout = .seconds(5)
    transportOptions.security = security
    let dataPlane = ZMQDataPlane(context: context, host: dataHost, options: transportOptions)
    events(ClusterEvent(.joining, endpoint: coordinator))  // `signals` already takes SIGINT and SIGTERM
    try Worker(options: options, control: ZMQControlConnector(context: context, coordinator: coordinator, security: security),
               dataPlane: dataPlane, signals: signals, events: events, log: { emit("\($0)\n") }).run()
}

/// Paths sent to workers are made absolute: a worker may run in another directory.
func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

extension ClusterOptions {
    var arguments: [String] {
        ["--allreduce", allreduce.rawValue, "--compress", compress, "--bucket-mb", "\(bucketMb)", "--transport", dataTransport,
         "--timeout", "\(timeout)", "--join-timeout", "\(joinTimeout)", "--precision", precision.precision.rawValue]
            + (noEval ? ["--no-eval"] : []) + checkpoints.arguments
    }
}
