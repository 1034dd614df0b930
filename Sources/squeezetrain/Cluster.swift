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
extension DataTransportKind: ExpressibleByArgument {}

/// `--compress`: a value that does not parse is refused naming the flag and the accepted forms.
extension GradientCompression: ExpressibleByArgument {
    public init?(argument: String) { try? self.init(parsing: argument) }
    public static var allValueStrings: [String] { ["none", "fp16", "bf16", "int8", "topk:F with 0 < F ≤ 1"] }
    public static var defaultCompletionKind: CompletionKind { .list(["none", "fp16", "bf16", "int8", "topk:"]) }
}

/// The all-reduce takes the compression (the tree refuses topk).
func validateAlgorithm(_ algorithm: AllReduceAlgorithm, compress: GradientCompression) throws {
    if let refusal = algorithm.refusal(compress) { throw ValidationError(refusal) }
}

/// Options of a cluster run beyond the training itself, shared by `coordinator`, `launch` and the benchmarks.
struct ClusterOptions: ParsableArguments {
    @Option(help: "All-reduce: ring (reduce-scatter + all-gather between workers), star (through the coordinator) or tree (partial sums up a binary tree of workers rooted at rank 0, the average down; not with --compress topk).")
    var allreduce: AllReduceAlgorithm = .ring
    @Option(help: "Gradient compression on the wire: none, fp16, bf16, int8 (per-chunk scale, error feedback) or topk:F (the fraction F of largest entries, error feedback).")
    var compress: GradientCompression = .none
    @Option(help: "Gradient bucket size in MB (buckets start as soon as backward has finished them).")
    var bucketMb: Double = 1
    @Option(help: ArgumentHelp("Data-plane transport between workers: tcp (frames sealed with AES-256-GCM under the run key) or ipc (same machine only, "
                               + "sockets in a directory only you can enter, nothing sealed). Default: tcp; launch: ipc, the control plane too.",
                               valueName: "transport"))
    var transport: DataTransportKind?
    /// The data plane's transport: `--transport`, else tcp (launch has its own default, ipc).
    var dataTransport: DataTransportKind { transport ?? .tcp }
    @Option(help: "Seconds of silence after which a worker counts as lost (workers heartbeat 4 times per timeout).")
    var timeout: Double = 10
    @Option(help: "Seconds to wait for all workers to join.")
    var joinTimeout: Double = 120
    @Flag(help: "Skip the test-set evaluation at each epoch end (otherwise every worker evaluates 1/N of it).")
    var noEval = false
    @Flag(help: "Elastic membership: a worker that dies (its connection drops) or hangs (--timeout) is removed, the others are renumbered and go on from the last completed step in memory, with the same global batch (ring, star or tree; docs/cluster.md).")
    var elastic = false
    @Option(help: "With --elastic: when fewer workers remain, the furthest writes a checkpoint (with --checkpoint-dir) and the run stops, naming the lost ranks.")
    var minWorkers = 1
    @Option(help: "With --elastic: the most workers the run may have. A worker started while the run trains (squeezetrain worker --coordinator …, or launch --replace-workers) joins it at the next step boundary, receiving the training state from a member; beyond this many it is refused. Default: --workers.")
    var maxWorkers: Int?
    @OptionGroup var checkpoints: CheckpointOptions
    @OptionGroup var precision: PrecisionOption

    func validate() throws {
        guard bucketMb.isFinite, bucketMb >= 0.001, bucketMb <= 4096 else { throw ValidationError("--bucket-mb must be in 0.001...4096 (got \(bucketMb))") }
        try validateAlgorithm(allreduce, compress: compress)
        guard timeout.isFinite, timeout >= 0.1, timeout <= 3600 else { throw ValidationError("--timeout must be in 0.1...3600 seconds (got \(timeout))") }
        guard minWorkers >= 1 else { throw ValidationError("--min-workers must be at least 1 (got \(minWorkers))") }
        if let maxWorkers {
            guard elastic else { throw ValidationError("--max-workers \(maxWorkers) needs --elastic: only an elastic run admits workers while it trains") }
            guard maxWorkers >= minWorkers else { throw ValidationError("--max-workers \(maxWorkers) is below --min-workers \(minWorkers)") }
        }
        guard joinTimeout.isFinite, joinTimeout >= 0.1, joinTimeout <= 86_400 else {
            throw ValidationError("--join-timeout must be in 0.1...86400 seconds (got \(joinTimeout))")
        }
    }
}

struct CoordinatorCommand: ReportingCommand {
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
    /// launch's: the rest of this process's configuration, a `CoordinatorProcess` in a private directory (the flags above are not read).
    @Option(help: .hidden) var config: String?

    func validate() throws {
        do { _ = try Endpoint(bind, flag: "--bind") } catch { throw ValidationError(error.description) }
        try requireRange("--workers", workers, 1...1024)
        guard config == nil else { return }
        guard training.batchSize % workers == 0 else {
            throw ValidationError("--batch-size \(training.batchSize) is the global batch; it must divide evenly over --workers \(workers)")
        }
        try tracing.requireStarHub(communication.allreduce)
        try training.validateDGC(compress: communication.compress)
    }

    func execute() throws {
        var process = try config.map { try ProcessConfigFile.read(CoordinatorProcess.self, from: $0) }
            ?? CoordinatorProcess(options: coordinatorOptions(bind: bind, workers: workers, training: training, cluster: communication,
                                                              metrics: metrics, initWeights: initWeights, saveWeights: saveWeights),
                                  access: security.access, trace: tracing.trace, traceWindow: tracing.window)
        (process.options.bind, process.options.workers) = (bind, workers)
        let summary = try ClusterRuntime.run(process, events: eventWriter(events), log: logLine)
        try endRun(summary, workers: workers, resume: process.options.checkpointDirectory != nil ? "--resume" : nil)
    }
}

/// The coordinator's options from the flags of `coordinator`, `launch`, `join` and `bench cluster`:
/// the one place they become a run (paths made absolute, since workers may run elsewhere).
func coordinatorOptions(bind: String, workers: Int, training: TrainingOptions, cluster: ClusterOptions,
                        metrics: String?, initWeights: String?, saveWeights: String?) -> CoordinatorOptions {
    let records = ClusterRuntime.trainingRecordCount(training.data)
    var config = training.config(trainingRecords: records, workers: workers)
    config.precision = cluster.precision.precision == .fp32 ? nil : cluster.precision.precision  // each worker checks its CPU
    var options = CoordinatorOptions(bind: bind, workers: workers, config: config)
    options.trainingRecords = records
    options.algorithm = cluster.allreduce
    options.compression = cluster.compress
    options.bucketBytes = Int(cluster.bucketMb * 1_048_576)
    options.transport = cluster.dataTransport
    options.timeout = .milliseconds(Int(cluster.timeout * 1000))
    options.joinTimeout = .milliseconds(Int(cluster.joinTimeout * 1000))
    options.metricsPath = metrics
    options.evaluate = !cluster.noEval
    options.checkpointDirectory = cluster.checkpoints.checkpointDir.map(absolutePath)
    options.checkpointEvery = cluster.checkpoints.checkpointEvery
    options.keepCheckpoints = cluster.checkpoints.keepCheckpoints
    options.resume = cluster.checkpoints.resume
    options.startOver = cluster.checkpoints.startOver
    options.elastic = cluster.elastic
    options.minWorkers = cluster.minWorkers
    options.maxWorkers = cluster.maxWorkers
    options.initWeights = initWeights.map(absolutePath)
    options.saveWeights = saveWeights.map(absolutePath)
    return options
}

/// A worker's options from the flags of `worker`, `launch`, `join` and `bench cluster`.
func workerOptions(threads: Int, data: String?, rank: Int?, joinTimeout: Double, trace: String?, window: TraceWindow) -> WorkerOptions {
    var options = WorkerOptions()
    options.threads = threads; options.data = data; options.rank = rank
    options.joinTimeout = .milliseconds(Int(joinTimeout * 1000))
    options.tracePath = trace; options.traceWindow = window
    return options
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
        let theory = s.theoryBytesPerRank.indices.contains(rank) ? s.theoryBytesPerRank[rank] : 0  // a rank an elastic run no longer has
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


struct WorkerCommand: ReportingCommand {
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
    /// launch's: the rest of this process's configuration, a `WorkerProcess` in a private directory (the flags above are not read).
    @Option(help: .hidden) var config: String?

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

    func execute() throws {
        var process = try config.map { try ProcessConfigFile.read(WorkerProcess.self, from: $0) } ?? self.process
        process.coordinator = coordinator
        try ClusterRuntime.run(process, events: eventWriter(events), log: logLine)
    }

    /// This worker as its flags describe it.
    var process: WorkerProcess {
        var options = workerOptions(threads: threads, data: data, rank: rank, joinTimeout: joinTimeout, trace: tracing.trace, window: tracing.window)
        if security.insecure { options.ownPaths = files.ownPaths }
        return WorkerProcess(coordinator: coordinator, options: options, access: security.access, advertise: advertise, cpus: cpus)
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

    var ownPaths: OwnPaths { Self.ownPaths(checkpointDir: checkpointDir, initWeights: initWeights, saveWeights: saveWeights) }

    /// A worker's own paths, made absolute.
    static func ownPaths(checkpointDir: String?, initWeights: String?, saveWeights: String?) -> OwnPaths {
        OwnPaths(checkpointDirectory: checkpointDir.map(absolutePath), initWeights: initWeights.map(absolutePath), saveWeights: saveWeights.map(absolutePath))
    }
}

/// Prints a finished run's summary; a run that stopped before its last step (a signal to the
/// coordinator: 128 + the signal; a worker's request: 1) ends with a non-zero exit code, and says how
/// to continue (`resume`, e.g. "--resume", when there are checkpoints).
func endRun(_ summary: ClusterSummary, workers: Int, resume: String?) throws {
    printSummary(summary, workers: workers)
    if summary.epochs.count > 1 {
        emit("membership: " + summary.epochs.map { "epoch \($0.number): \($0.worldSize) worker(s) from step \($0.fromStep)" }.joined(separator: "; ")
             + "; lost: " + summary.departures.map(\.description).joined(separator: "; ") + "\n")
    }
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

/// Paths sent to workers are made absolute: a worker may run in another directory.
func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

/// Writes `ClusterEvent` lines on standard output when asked to (`--events`), else nothing.
func eventWriter(_ enabled: Bool) -> (ClusterEvent) -> Void {
    enabled ? { emit($0.line + "\n") } : { _ in }
}

/// A log line of a cluster process.
func logLine(_ line: String) { emit(line + "\n") }
