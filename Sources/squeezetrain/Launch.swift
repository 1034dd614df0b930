import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import SqueezeSystem
import SqueezeTraining

struct Launch: ParsableCommand {
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
        guard training.batchSize % workers == 0 else {
            throw ValidationError("--batch-size \(training.batchSize) is the global batch; it must divide evenly over --workers \(workers)")
        }
        guard maxRestarts >= 0 else { throw ValidationError("--max-restarts must not be negative") }
        if maxRestarts > 0 && cluster.checkpoints.checkpointDir == nil {
            throw ValidationError("--max-restarts needs --checkpoint-dir: a restart resumes from the newest checkpoint")
        }
    }

    func run() throws {
        do {
            // Refused before any process starts; the coordinator takes the lock itself.
            if let dir = cluster.checkpoints.checkpointDir { try DirectoryLock.requireFree(absolutePath(dir)) }
            let current = CurrentGroup()
            let forwarder = SignalForwarder { current.terminate($0) }
            defer { withExtendedLifetime(forwarder) {} }
            // Without --key-file or --insecure, a fresh key for this run only, readable by this user only.
            // (Not for an ipc control plane: its private directory keeps everyone else out, and a run without a key seals nothing.)
            var security = self.security
            let key = security.insecure || security.keyPath != nil || controlOnIPC ? nil : try EphemeralKey()
            defer { key?.remove() }
            if let key { security.keyFile = key.path }
            emit("[launch] \(workers) worker(s); \(protectionSummary(security))\n")
            let traceParts = try tracing.trace.map { try TraceParts(file: $0) }
            defer { traceParts?.merge() }  // also after a failure or a signal: what the processes recorded
            var restarts = 0
            while true {
                let group = ProcessGroup(try specs(resume: cluster.checkpoints.resume || restarts > 0, security: security, trace: traceParts,
                                                   attempt: restarts),
                                         write: current.write,
                                         onEvent: { current.handle($1) })
                current.set(group)
                try group.start()
                // On Ctrl-C/SIGTERM the processes stop by themselves a few steps later (after a
                // checkpoint, with --checkpoint-dir); they are killed only if that takes over 30 s.
                let outcome = group.wait(primary: "coordinator", gracePeriod: .seconds(30))
                guard case .failed(let culprit, let description) = outcome, restarts < maxRestarts, !current.stopped else {
                    guard outcome == .success else { throw fail("launch: \(outcome)", code: outcome.exitCode) }
                    return
                }
                restarts += 1
                let failedAt = Date()
                let lastStep = metrics.flatMap { lastReportedStep(in: absolutePath($0)) }
                let resumeStep = current.lastCheckpoint ?? 0
                emit("[launch] \(description); restart \(restarts) of \(maxRestarts): every process restarts from the checkpoint at step \(resumeStep)"
                     + (lastStep.map { " (the run had reached step \($0))" } ?? "") + "\n")
                current.onReady = { [metrics] in
                    guard let metrics else { return }
                    let writer = try? MetricsWriter(path: absolutePath(metrics), append: true)
                    writer?.record(RestartEvent(restart: restarts, process: culprit, reason: description, failedStep: lastStep ?? -1,
                                                resumeStep: resumeStep, recoverySeconds: Date().timeIntervalSince(failedAt)))
                }
            }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail(String(describing: error))
        }
    }

    /// The data plane's transport: `--transport`, else ipc (everything stays on this machine).
    var dataTransport: String { cluster.transport ?? "ipc" }
    /// The control plane is on ipc too, in the private socket directory, unless `--port` or `--host` ask for tcp.
    var controlOnIPC: Bool { dataTransport == "ipc" && port == nil && host == nil }

    /// Which transport carries each plane and what protects it (the start line).
    func protectionSummary(_ security: SecurityOptions) -> String {
        let directory = (try? privateSocketDirectory()) ?? "the private socket directory"
        let control = controlOnIPC ? "control plane on ipc in \(directory)" : "control plane on tcp"
        if security.insecure { return "\(control), data plane on \(dataTransport); --insecure: no authentication, no encryption" }
        let controlProtection = security.keyPath == nil ? "(only this user can enter it; no key)" : "(CURVE)"
        let data = dataTransport == "tcp" ? "data plane on tcp, every frame sealed with AES-256-GCM"
            : "data plane on ipc in \(directory), nothing sealed (only this user can reach it)"
        return "\(control) \(controlProtection), \(data)"
    }

    func specs(resume: Bool, security: SecurityOptions, trace: TraceParts? = nil, attempt: Int = 0) throws -> [ProcessSpec] {
        let host = self.host ?? "127.0.0.1"
        let endpoint = controlOnIPC ? try ipcEndpoint("launch-control-\(attempt)") : "tcp://\(host):\(try port ?? freeTCPPort(host: host))"
        let exe = selfExecutable()
        var options = cluster
        options.transport = dataTransport
        options.checkpoints.resume = resume
        if resume { options.checkpoints.startOver = false }  // a restart continues what the first attempt wrote
        var coordinator = ["coordinator", "--bind", endpoint, "--workers", "\(workers)", "--events"] + training.arguments + options.arguments
            + security.arguments
        if let metrics { coordinator += ["--metrics", absolutePath(metrics)] }
        if let initWeights { coordinator += ["--init-weights", absolutePath(initWeights)] }
        if let saveWeights { coordinator += ["--save-weights", absolutePath(saveWeights)] }
        if let trace, cluster.allreduce == .star { coordinator += tracing.arguments(path: trace.path(rank: nil)) }
        var all = [ProcessSpec(name: "coordinator", executable: exe, arguments: coordinator)]
        for r in 0..<workers {
            var args = ["worker", "--coordinator", endpoint, "--rank", "\(r)", "--threads", "\(threads)", "--events",
                        "--join-timeout", "\(cluster.joinTimeout)"] + security.arguments
            if let data = training.data { args += ["--data", data] }
            if security.insecure {  // an unauthenticated worker uses only the paths on its own command line
                args += WorkerFiles.arguments(checkpointDir: cluster.checkpoints.checkpointDir, initWeights: initWeights, saveWeights: saveWeights)
            }
            args += bindTo.arguments(rank: r, threads: threads)
            if let trace { args += tracing.arguments(path: trace.path(rank: r)) }
            all.append(ProcessSpec(name: "worker \(r)", executable: exe, arguments: args))
        }
        return all
    }
}

/// The process group of the current attempt, for signal forwarding, for noticing when a
/// restarted cluster is training again, and for the last checkpoint (both from `ClusterEvent`s).
final class CurrentGroup: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `lock`.
    private let lock = NSLock()
    private var group: ProcessGroup?
    private var stop = false
    private var ready: (() -> Void)?
    private var checkpointStep: Int?

    func set(_ g: ProcessGroup) { lock.withLock { group = g } }
    var stopped: Bool { lock.withLock { stop } }
    /// Called once, when the coordinator reports all workers ready.
    var onReady: (() -> Void)? {
        get { lock.withLock { ready } }
        set { lock.withLock { ready = newValue } }
    }
    /// The newest step a checkpoint holds: where an attempt started (a resume), or what rank 0 wrote since.
    var lastCheckpoint: Int? { lock.withLock { checkpointStep } }

    func terminate(_ signal: Int32) {
        let g = lock.withLock { stop = true; return group }
        g?.terminate(signal: signal)
    }

    func write(_ line: String) {
        FileHandle.standardOutput.write(Data(line.utf8))
    }

    func handle(_ event: ClusterEvent) {
        switch event.event {
        case .ready:
            let callback = lock.withLock { () -> (() -> Void)? in
                if let s = event.step, s > 0 { checkpointStep = max(checkpointStep ?? 0, s) }
                defer { ready = nil }
                return ready
            }
            callback?()
        case .checkpoint:
            lock.withLock { if let s = event.step { checkpointStep = max(checkpointStep ?? 0, s) } }
        case .listening, .joining:
            break
        }
    }
}

/// The highest `step` among the per-worker lines of a metrics file.
func lastReportedStep(in path: String) -> Int? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    let decoder = JSONDecoder()
    return text.split(separator: "\n").compactMap { line -> Int? in
        guard let header = try? decoder.decode(MetricsLineHeader.self, from: Data(line.utf8)), header.rank != nil else { return nil }
        return header.step
    }.max()
}

/// Where `launch` puts its workers.
enum WorkerBinding: String, ExpressibleByArgument, CaseIterable {
    case core, none

    /// The worker's `--cpus` arguments: rank r gets `threads` CPUs of its own.
    func arguments(rank: Int, threads: Int) -> [String] {
        guard self == .core else { return [] }
        return ["--cpus", CPUAffinity.cpus(forLocalRank: rank, count: threads).map(String.init).joined(separator: ",")]
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
