import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import SqueezeSystem
import SqueezeTraining

struct Launch: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a coordinator and N workers as separate processes on this machine (like torchrun --nproc-per-node).",
        discussion: """
        Each process's lines are prefixed with its role and rank. Ctrl-C or SIGTERM stops all of them; \
        if any process fails, the others are stopped and the exit status is non-zero, naming the culprit. \
        If launch itself is killed, the processes end with it (SIGKILL from the kernel).
        """)

    @Option(help: "Worker processes.") var workers = 2
    @Option(help: "Compute threads per worker.") var threads = 1
    @Option(help: "core: give worker r --threads CPUs of its own (round-robin over the allowed CPUs), as mpirun --bind-to core does; none: leave placement to the scheduler.")
    var bindTo: WorkerBinding = .none
    @Option(help: "Coordinator port (default: a free one); puts the control plane on tcp.") var port: Int?
    @Option(help: "Address the coordinator binds and workers connect to (default: 127.0.0.1); puts the control plane on tcp.") var host: String?
    @OptionGroup var training: TrainingOptions
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "Write JSON lines here: one per worker per step.") var metrics: String?
    @Option(help: "Initial weights for every worker (safetensors).") var initWeights: String?
    @Option(help: "Rank 0 writes the final weights here.") var saveWeights: String?
    @Option(help: "After a failure, restart every process from the newest checkpoint, at most R times (needs --checkpoint-dir).")
    var maxRestarts = 0
    @Option(help: "With --elastic: start a new worker process in place of one that dies or fails, at most N times; it joins the run at the next step boundary (up to --max-workers).")
    var replaceWorkers = 0
    @OptionGroup var security: SecurityOptions
    @OptionGroup(title: "Timeline (every worker records its rank's track, the coordinator the star hub's; launch merges them into FILE)")
    var tracing: TraceOptions

    func validate() throws {
        guard workers >= 1, workers <= maxLocalWorkers else {
            throw ValidationError("--workers must be in 1...\(maxLocalWorkers) (got \(workers)): launch starts every worker on this machine, "
                + "which has \(ProcessInfo.processInfo.activeProcessorCount) CPU(s); more than four processes per CPU only thrash. "
                + "Across machines, start workers there (cluster/README.md)")
        }
        try requireRange("--threads", threads, 1...256)
        if let port { try requireRange("--port", port, 1...65535) }
        try training.validateDGC(compress: cluster.compress)
        guard training.batchSize % workers == 0 else {
            throw ValidationError("--batch-size \(training.batchSize) is the global batch; it must divide evenly over --workers \(workers)")
        }
        guard maxRestarts >= 0 else { throw ValidationError("--max-restarts must not be negative") }
        if cluster.elastic && maxRestarts > 0 {
            throw ValidationError("--elastic and --max-restarts are two answers to a lost worker (go on without it, or restart every process from "
                                  + "a checkpoint): give one")
        }
        if cluster.minWorkers > workers { throw ValidationError("--min-workers \(cluster.minWorkers) is more than --workers \(workers)") }
        if let max = cluster.maxWorkers, max < workers { throw ValidationError("--max-workers \(max) is fewer than --workers \(workers)") }
        guard replaceWorkers >= 0 else { throw ValidationError("--replace-workers must not be negative") }
        if replaceWorkers > 0 && !cluster.elastic {
            throw ValidationError("--replace-workers needs --elastic: a replacement joins the running run (without --elastic, --max-restarts restarts every process)")
        }
        if maxRestarts > 0 && cluster.checkpoints.checkpointDir == nil {
            throw ValidationError("--max-restarts needs --checkpoint-dir: a restart resumes from the newest checkpoint")
        }
    }

    func execute() throws {
        // Refused before any process starts; the coordinator takes the lock itself.
        if let dir = cluster.checkpoints.checkpointDir { try DirectoryLock.requireFree(absolutePath(dir)) }
        let supervisor = RestartSupervisor(maxRestarts: maxRestarts, metricsPath: metrics.map(absolutePath), log: { emit($0) })
        let forwarder = SignalForwarder { supervisor.terminate($0) }
        defer { withExtendedLifetime(forwarder) {} }
        let run = try RunDirectory(prefix: "squeezetrain-launch-")
        defer { run.remove() }
        // Without --key-file or --insecure, a fresh key for this run only, readable by this user only.
        // (Not for an ipc control plane: its private directory keeps everyone else out, and a run without a key seals nothing.)
        var access = security.access
        if !access.insecure && access.keyFile == nil && !controlOnIPC { access.keyFile = try run.makeKey() }
        emit("[launch] \(workers) worker(s); \(protectionSummary(access))\n")
        let traceParts = try tracing.trace.map { try TraceParts(file: $0) }
        defer { traceParts?.merge() }  // also after a failure or a signal: what the processes recorded
        let outcome = try supervisor.run { attempt in
            let group = ProcessGroup(try specs(resume: cluster.checkpoints.resume || attempt > 0, access: access, in: run, trace: traceParts,
                                               attempt: attempt),
                                     onEvent: { supervisor.handle($1) })
            if cluster.elastic { group.survivable = Set((0..<workers).map { "worker \($0)" }) }  // the coordinator goes on without them
            group.replacements = replaceWorkers
            supervisor.started(group)
            try group.start()
            // On Ctrl-C/SIGTERM the processes stop by themselves a few steps later (after a
            // checkpoint, with --checkpoint-dir); they are killed only if that takes over 30 s.
            return group.wait(primary: "coordinator", gracePeriod: .seconds(30))
        }
        guard outcome == .success else {
            printError("launch: \(outcome)")
            throw ExitCode(outcome.exitCode)
        }
    }

    /// The data plane's transport: `--transport`, else ipc (everything stays on this machine).
    var dataTransport: DataTransportKind { cluster.transport ?? .ipc }
    /// The control plane is on ipc too, in the private socket directory, unless `--port` or `--host` ask for tcp.
    var controlOnIPC: Bool { dataTransport == .ipc && port == nil && host == nil }

    /// Which transport carries each plane and what protects it (the start line).
    func protectionSummary(_ access: PeerAccess) -> String {
        let directory = (try? privateSocketDirectory()) ?? "the private socket directory"
        let control = controlOnIPC ? "control plane on ipc in \(directory)" : "control plane on tcp"
        if access.insecure { return "\(control), data plane on \(dataTransport.rawValue); --insecure: no authentication, no encryption" }
        let controlProtection = access.keyFile == nil ? "(only this user can enter it; no key)" : "(CURVE)"
        let data = dataTransport == .tcp ? "data plane on tcp, every frame sealed with AES-256-GCM"
            : "data plane on ipc in \(directory), nothing sealed (only this user can reach it)"
        return "\(control) \(controlProtection), \(data)"
    }

    /// The processes of attempt `attempt`, their configurations written into `run`.
    func specs(resume: Bool, access: PeerAccess, in run: RunDirectory, trace: TraceParts? = nil, attempt: Int = 0) throws -> [ProcessSpec] {
        let host = self.host ?? "127.0.0.1"
        let endpoint = controlOnIPC ? try ipcEndpoint("launch-control-\(attempt)") : "tcp://\(host):\(try port ?? freeTCPPort(host: host))"
        var options = cluster
        options.transport = dataTransport
        options.checkpoints.resume = resume
        if resume { options.checkpoints.startOver = false }  // a restart continues what the first attempt wrote
        let coordinator = CoordinatorProcess(
            options: coordinatorOptions(bind: endpoint, workers: workers, training: training, cluster: options, metrics: metrics.map(absolutePath),
                                        initWeights: initWeights, saveWeights: saveWeights),
            access: access, trace: cluster.allreduce == .star ? trace?.path(rank: nil) : nil, traceWindow: tracing.window)
        var all = [try run.spec("coordinator", coordinator, ["coordinator", "--bind", endpoint, "--workers", "\(workers)", "--events"])]
        for r in 0..<workers {
            var worker = workerOptions(threads: threads, data: training.data, rank: r, joinTimeout: cluster.joinTimeout,
                                       trace: trace?.path(rank: r), window: tracing.window)
            if access.insecure {  // an unauthenticated worker uses only the paths it was given itself
                worker.ownPaths = WorkerFiles.ownPaths(checkpointDir: cluster.checkpoints.checkpointDir, initWeights: initWeights, saveWeights: saveWeights)
            }
            let process = WorkerProcess(coordinator: endpoint, options: worker, access: access, cpus: bindTo.cpus(rank: r, threads: threads))
            all.append(try run.spec("worker \(r)", process, ["worker", "--coordinator", endpoint, "--rank", "\(r)", "--events"]))
        }
        return all
    }
}

/// Where `launch` puts its workers.
enum WorkerBinding: String, ExpressibleByArgument, CaseIterable {
    case core, none

    /// The CPUs of worker `rank` as `--cpus` takes them: with `core`, `threads` CPUs of its own.
    func cpus(rank: Int, threads: Int) -> String? {
        guard self == .core else { return nil }
        return CPUAffinity.cpus(forLocalRank: rank, count: threads).map(String.init).joined(separator: ",")
    }
}

/// `launch --trace FILE`: each process writes its own track into a directory beside FILE (the
/// workers `rank-R.json`, the star hub `hub.json`); `merge` puts them into FILE, one pid per rank,
/// and removes the directory. A process that failed leaves what it recorded, or nothing.
final class TraceParts {
    let file: String
    let directory: String

    init(file: String) throws {
        self.file = absolutePath(file)
        let dir = (self.file as NSString).deletingLastPathComponent
        do {
            directory = try makePrivateDirectory(prefix: "." + (self.file as NSString).lastPathComponent + ".parts-", in: dir)
        } catch {
            throw ValidationError("--trace \(file): cannot create a directory beside it for the processes' tracks: \(error)")
        }
    }

    func path(rank: Int?) -> String { directory + "/" + (rank.map { "rank-\($0).json" } ?? "hub.json") }

    func merge() {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let parts = ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
        var events = [TraceEvent]()
        for part in parts {
            do { events += try TraceFile.read(directory + "/" + part) } catch { emit("[launch] warning: \(error); left out of \(file)\n") }
        }
        do {
            try TraceFile.write(events, to: file)
            emit("[launch] timeline of \(parts.count) process(es) written to \(file)\n")
        } catch {
            emit("[launch] warning: the timeline was not written: \(error)\n")
        }
    }
}
