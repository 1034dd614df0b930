import ArgumentParser
import Foundation
import SqueezeCluster
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

/// One process of a run placed by a scheduler: every process runs the same command line, and each
/// learns its place from the launcher's environment (`JobEnvironment`). Rank 0 runs the coordinator
/// on threads of its own beside its worker; every rank runs a worker.
struct Join: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Be one process of a run started by torchrun, SLURM (srun), Open MPI (mpirun) or Kubernetes: the same command line everywhere.",
        discussion: """
        Rank, world size, local rank and the coordinator's address come from the environment, the first \
        launcher found winning: torchrun/PyTorchJob (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, \
        MASTER_ADDR, MASTER_PORT), Open MPI (OMPI_COMM_WORLD_RANK or PMIX_RANK, OMPI_COMM_WORLD_SIZE, \
        OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE; the host from MASTER_ADDR), SLURM \
        (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_TASKS_PER_NODE, SLURM_CPUS_PER_TASK; the host is the \
        first of SLURM_JOB_NODELIST unless MASTER_ADDR is set). The port is MASTER_PORT, else 29500; under \
        torchrun itself (TORCHELASTIC_* variables set) it is MASTER_PORT + 2, because torchrun's agent \
        serves its own store on MASTER_PORT (and + 1, of the parity Linux gives outgoing connections, is \
        often held by one when torchrun picks MASTER_PORT). Flags override the environment. Rank 0 binds \
        the coordinator on all interfaces at that port (refusing, with the port and the process holding \
        it, when it is taken) and also trains as worker 0; the others connect to MASTER_ADDR at that \
        port, retrying until --join-timeout. Paths (--checkpoint-dir, --metrics, --init-weights, --save-weights) are used by \
        rank 0's coordinator and workers alike: put them on a shared filesystem. After a requeue or a \
        restart, the same command with --resume continues from the newest checkpoint, with the same or \
        another number of processes. torchrun's own restarts (--max-restarts, TORCHELASTIC_RESTART_COUNT \
        > 0) continue from the newest checkpoint in --checkpoint-dir without --resume, when this torchrun \
        job's first start passed the checkpoint checks there.
        """)

    @OptionGroup var training: TrainingOptions
    @OptionGroup var cluster: ClusterOptions
    @Option(help: "This process's rank (default: RANK, OMPI_COMM_WORLD_RANK or SLURM_PROCID).")
    var rank: Int?
    @Option(help: "Processes in the run (default: WORLD_SIZE, OMPI_COMM_WORLD_SIZE or SLURM_NTASKS).")
    var worldSize: Int?
    @Option(help: "This process's index among the run's processes on this host, for --bind-to core (default: LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK or SLURM_LOCALID, else 0).")
    var localRank: Int?
    @Option(help: "Host of rank 0, where the coordinator listens (default: MASTER_ADDR; under SLURM the first host of SLURM_JOB_NODELIST).")
    var masterAddr: String?
    @Option(help: "The coordinator's port (default: MASTER_PORT, else 29500; under torchrun MASTER_PORT + 2, as torchrun's store holds MASTER_PORT).")
    var masterPort: Int?
    @Option(help: "Compute threads (default: this process's share of the CPUs it may use: the allowed CPUs divided by the run's processes on this host).")
    var threads: Int?
    @Option(help: "core: run on --threads CPUs of its own, chosen by local rank (as mpirun --bind-to core); none: leave placement to the scheduler.")
    var bindTo: WorkerBinding = .none
    @Option(help: "Address other processes use to reach this one's data plane (default: the local address on the route to the coordinator).")
    var advertise: String?
    @Option(help: "Rank 0 writes JSON lines here: one per worker per step.")
    var metrics: String?
    @Option(help: "Initial weights (safetensors) for every worker, instead of the seed.")
    var initWeights: String?
    @Option(help: "Rank 0 writes the final weights here (safetensors, torchvision names).")
    var saveWeights: String?
    @OptionGroup var security: SecurityOptions
    @OptionGroup(title: "Timeline (rank R writes FILE with .rank-R before its extension; with --allreduce star rank 0 also writes the hub's, .hub)")
    var tracing: TraceOptions

    func validate() throws {
        if let threads { try requireRange("--threads", threads, 1...256) }
        if let rank { try requireRange("--rank", rank, 0...JobEnvironment.maxWorldSize - 1) }
        if let worldSize { try requireRange("--world-size", worldSize, 1...JobEnvironment.maxWorldSize) }
        if let localRank { try requireRange("--local-rank", localRank, 0...JobEnvironment.maxWorldSize - 1) }
        if let masterPort { try requireRange("--master-port", masterPort, 1...65535) }
        try training.validateDGC(compress: cluster.compress)
    }

    /// The flags that override the environment.
    var overrides: JobEnvironment.Overrides {
        .init(rank: rank, worldSize: worldSize, localRank: localRank, masterAddr: masterAddr, masterPort: masterPort)
    }

    func execute() throws {
        let job: JobEnvironment
        do { job = try JobEnvironment.detect(ProcessInfo.processInfo.environment, overrides: overrides) } catch { throw ClusterError("join: \(error)") }
        guard training.batchSize % job.worldSize == 0 else {
            throw ClusterError("join: --batch-size \(training.batchSize) is the global batch; it must divide evenly over the \(job.worldSize) processes of the run")
        }
        let allowed = CPUAffinity.allowedCPUs().count
        let share = job.threadShare(allowedCPUs: allowed)
        let threads = self.threads ?? share.threads
        let given = [("--rank", rank), ("--world-size", worldSize), ("--local-rank", localRank), ("--master-port", masterPort)]
            .compactMap { $0.1 == nil ? nil : $0.0 } + (masterAddr == nil ? [] : ["--master-addr"])
        var cluster = self.cluster
        let restart = job.elastic.map { TorchrunRestart(elastic: $0, checkpoints: cluster.checkpoints) }
        if let restart, restart.continues {
            cluster.checkpoints.resume = true
            cluster.checkpoints.startOver = false  // a restart continues what the first start wrote
        }
        emit("join: \(job)" + (given.isEmpty ? "" : " (\(given.joined(separator: ", ")) from the command line)")
             + "; \(threads) compute thread(s)"
             + (self.threads == nil ? " (\(share.reason))" : "")
             + (restart.map { "; \($0)" } ?? "")
             + "\n")
        // Before any thread starts (signals, compute, libzmq I/O): they inherit the binding.
        if bindTo == .core {
            let cpus = CPUAffinity.cpus(forLocalRank: job.localRank, count: threads)
            do { try CPUAffinity.bindCurrentThread(to: cpus) } catch { throw ClusterError("join: --bind-to core (local rank \(job.localRank)): \(error)") }
            emit("join: bound to CPU(s) \(CPUAffinity.allowedCPUs().map(String.init).joined(separator: ","))\n")
        }
        ComputeThreads.set(threads)

        var options = workerOptions(threads: threads, data: training.data, rank: job.rank, joinTimeout: cluster.joinTimeout,
                                    trace: tracing.joinPath(rank: job.rank), window: tracing.window)
        // Every process finds its own address on the route to rank 0's host.
        let route = "tcp://\(job.coordinatorHost):\(job.coordinatorPort)"
        let advertise = advertise
        let dataHost: @Sendable () throws -> String = { try advertise ?? localAddress(towards: route) }
        let peers: PeerSecurity
        do { peers = try security.access.security(endpoint: route) } catch { throw ClusterError("join: \(error)") }
        if peers == .insecure {  // every process has the same command line: its own paths are the coordinator's
            options.ownPaths = WorkerFiles.ownPaths(checkpointDir: cluster.checkpoints.checkpointDir, initWeights: initWeights, saveWeights: saveWeights)
        }
        guard job.rank == 0 else {
            // A signal before training ends this process; during training it asks the coordinator to stop the run.
            let signals = stopOnSignals()
            return try ClusterRuntime.runWorker(coordinator: route, options: options, dataHost: dataHost, security: peers, signals: signals, log: logLine)
        }
        if let restart, restart.elastic.restartCount == 0 {
            do { try restart.recordFirstStart() } catch { throw ClusterError("join: \(error)") }
        }
        try runRankZero(job, cluster: cluster, worker: options, dataHost: dataHost, security: peers)
    }

    /// The coordinator on a thread of its own, worker 0 on this one (connected over loopback).
    private func runRankZero(_ job: JobEnvironment, cluster: ClusterOptions, worker: WorkerOptions,
                             dataHost: @escaping @Sendable () throws -> String, security: PeerSecurity) throws {
        switch isThisHost(job.coordinatorHost) {
        case false:
            throw ClusterError("join: rank 0 runs the coordinator on this machine (\(ProcessInfo.processInfo.hostName)), but the others will look for it at "
                       + "\(job.coordinatorHost), which is not an address of this machine; set MASTER_ADDR (or --master-addr) to rank 0's host")
        case nil:
            emit("join: warning: \(job.coordinatorHost) does not resolve here (yet); the other ranks must reach this machine by that name\n")
        case true:
            break
        }
        if let refusal = tcpPortRefusal(job.coordinatorPort) {
            let fix = job.storePort.map { "torchrun's agent holds MASTER_PORT \($0) and join takes MASTER_PORT + 2; give join --master-port with a free port, or torchrun another --master-port" }
                ?? (masterPort != nil ? "give --master-port a free port" : "set MASTER_PORT (or --master-port) to a free port")
            throw ClusterError("join: rank 0 cannot run the coordinator: \(refusal); \(fix)")
        }
        let stop = stopOnSignals()  // before any other thread starts: they inherit the blocked signals
        let hubTrace = cluster.allreduce == .star ? tracing.joinPath(rank: nil) : nil
        let hubTracer = hubTrace.map { Tracer(path: $0, pid: job.worldSize, processName: "star hub (coordinator)", window: tracing.window) }
        var options = coordinatorOptions(bind: "tcp://0.0.0.0:\(job.coordinatorPort)", workers: job.worldSize, training: training, cluster: cluster,
                                         metrics: metrics, initWeights: initWeights, saveWeights: saveWeights)
        options.tracer = hubTracer
        // A coordinator that fails ends the process at once (its error on standard error): worker 0
        // could otherwise wait for it until its timeouts.
        let coordinator = CoordinatorThread(onFailure: { error in
            printError("coordinator: \(error)")
            Foundation.exit(1)
        }) { [options] in
            try ClusterRuntime.runCoordinator(options, security: security, stop: stop, hubHost: dataHost, log: logLine)
        }
        do {
            // The signals are the coordinator's (it stops every rank at one step); this worker follows it.
            try ClusterRuntime.runWorker(coordinator: "tcp://127.0.0.1:\(job.coordinatorPort)", options: worker, dataHost: dataHost,
                                         security: security, signals: StopToken(), log: logLine)
        } catch {
            // The coordinator has been told; give it the time to tell the others before exiting.
            printError("\(error)")
            _ = coordinator.wait(timeout: .seconds(Int(cluster.timeout.rounded(.up)) + 5))
            throw ExitCode(1)
        }
        guard case .success(let summary)? = coordinator.wait(timeout: .seconds(Int(cluster.timeout.rounded(.up)) * 4 + 30)) else {
            throw ClusterError("join: worker 0 finished but the coordinator did not")
        }
        try endRun(summary, workers: job.worldSize, resume: cluster.checkpoints.checkpointDir != nil ? "join --resume" : nil)
    }
}

/// What a process started by torchrun's agent does with `--checkpoint-dir`. A restart (the agent's
/// `TORCHELASTIC_RESTART_COUNT` > 0) continues from the newest checkpoint, as `--resume` would, when
/// this torchrun job's first start passed today's checks there: rank 0's first start records it in the
/// directory (`markerName`) once today's rules pass, after deleting any earlier job's record. A first
/// start refused for an earlier run's checkpoints thus leaves no record, and its restarts are refused
/// the same way instead of resuming that run.
struct TorchrunRestart: CustomStringConvertible {
    static let markerName = "torchrun-first-start"
    var elastic: JobEnvironment.TorchElastic
    var checkpoints: CheckpointOptions

    private var marker: String? { checkpoints.checkpointDir.map { (absolutePath($0) as NSString).appendingPathComponent(Self.markerName) } }
    /// Whether this start continues the first start's checkpoints.
    var continues: Bool { elastic.restartCount > 0 && marker.map(FileManager.default.fileExists) == true }

    var description: String {
        let attempt = "torchrun restart \(elastic.restartCount)" + (elastic.maxRestarts.map { " of \($0)" } ?? "")
        switch (elastic.restartCount, checkpoints.checkpointDir) {
        case (0, nil): return "torchrun first start; without --checkpoint-dir a restart starts again at step 0"
        case (0, let dir?): return "torchrun first start; a restart continues from the newest checkpoint in \(dir)"
        case (_, nil): return "\(attempt): starts again at step 0 (no --checkpoint-dir)"
        case (_, let dir?) where continues: return "\(attempt): continues from the newest checkpoint in \(dir), as --resume would"
        case (_, let dir?):
            return "\(attempt), but this torchrun job's first start did not pass the checkpoint check in \(dir) (no \(Self.markerName) there): "
                + "the checkpoints there are resumed only with --resume"
        }
    }

    /// Rank 0 at the first start: deletes an earlier job's record, checks the directory as the coordinator
    /// will (an earlier run's checkpoints are refused without --resume or --start-over), then records this start.
    func recordFirstStart() throws {
        guard let dir = checkpoints.checkpointDir.map(absolutePath), let marker else { return }
        try DirectoryLock.requireFree(dir)     // another run's directory: touch nothing
        try CheckpointDirectory.check(dir)     // ours and private (created 0700 if missing)
        try? FileManager.default.removeItem(atPath: marker)
        if !checkpoints.resume && !checkpoints.startOver { try Checkpoint.requireNoCheckpoints(in: dir) }
        let text = "torchrun job \(elastic.runID ?? "(no TORCHELASTIC_RUN_ID)") first started here at \(Date()); "
            + "its restarts continue these checkpoints\n"
        try AtomicFile.write(Array(text.utf8), to: marker)
    }
}
