import Foundation

/// Where a process of a multi-process job stands: its rank, the job's size, its rank on this host and
/// the coordinator's address, read from the variables that the launcher the job runs under sets.
///
/// Launchers, in the order they are tried (the first whose rank variable is set wins):
/// - torchrun and Kubeflow's PyTorchJob: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (`LOCAL_WORLD_SIZE`),
///   `MASTER_ADDR`, `MASTER_PORT`; under torchrun itself (its `TORCHELASTIC_*` variables are set) the
///   port is `MASTER_PORT + 2`, as torchrun's agent serves its own store on `MASTER_PORT`;
/// - SLURM (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` (`SLURM_NTASKS_PER_NODE` or
///   `SLURM_TASKS_PER_NODE`, and `SLURM_CPUS_PER_TASK` for the thread count); the coordinator runs on the first host of `SLURM_JOB_NODELIST` unless
///   `MASTER_ADDR` names one; the port is `MASTER_PORT` or `defaultPort`;
/// - Open MPI (`mpirun`): `OMPI_COMM_WORLD_RANK` (and PMIx's `PMIX_RANK`, which must agree),
///   `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK` (`OMPI_COMM_WORLD_LOCAL_SIZE`); the
///   coordinator's host comes from `MASTER_ADDR` (or `--master-addr`).
///
/// SLURM's variables are passed over when Open MPI's are set: `mpirun` inside a SLURM allocation
/// hands every rank the batch step's `SLURM_PROCID`, so only Open MPI's rank is right there.
/// Values given explicitly (`Overrides`, from flags) replace what the environment says.
public struct JobEnvironment: Equatable, Sendable, CustomStringConvertible {
    public enum Source: String, Sendable { case torchrun, slurm, openMPI = "open-mpi", flags }

    public var source: Source
    public var rank: Int
    public var worldSize: Int
    /// This process's index among the job's processes on this host (for CPU binding).
    public var localRank: Int
    /// Processes of this job on this host, when the launcher says (for the default thread count).
    public var localWorldSize: Int?
    public var coordinatorHost: String
    public var coordinatorPort: Int
    /// CPUs the launcher reserved for each process (SLURM's `SLURM_CPUS_PER_TASK`), when it says.
    public var cpusPerProcess: Int? = nil
    /// torchrun's agent, when it started this process (its `TORCHELASTIC_*` variables are set).
    public var elastic: TorchElastic? = nil
    /// `MASTER_PORT` when the coordinator's port is `MASTER_PORT + 2`: under torchrun, without `--master-port`.
    /// torchrun's agent serves its rendezvous store (a TCPStore) on `MASTER_PORT` before it starts the
    /// workers, so that port is never free there; a fixed offset is a rule every rank computes alone,
    /// with nothing to publish through torchrun's store. Not + 1: torchrun picks `MASTER_PORT` with a
    /// bind to port 0, which Linux answers with an odd port, and it hands the even ones to outgoing
    /// connections (connect()), whose sockets and TIME_WAIT remnants then hold + 1 far more often
    /// than + 2, the next port of the parity that outgoing connections leave alone.
    public var storePort: Int? = nil

    /// What torchrun's agent tells its workers beyond torchrun's convention.
    public struct TorchElastic: Equatable, Sendable {
        /// `TORCHELASTIC_RESTART_COUNT`: 0 on the first start, N after the agent restarted the workers N times.
        public var restartCount: Int
        /// `TORCHELASTIC_MAX_RESTARTS` (torchrun's `--max-restarts`), when set.
        public var maxRestarts: Int?
        /// `TORCHELASTIC_RUN_ID` (torchrun's `--rdzv-id`), when set.
        public var runID: String?
        public init(restartCount: Int, maxRestarts: Int? = nil, runID: String? = nil) {
            self.restartCount = restartCount; self.maxRestarts = maxRestarts; self.runID = runID
        }
    }

    /// The port when neither `MASTER_PORT` nor a flag gives one (torchrun's default).
    public static let defaultPort = 29500
    /// The largest job `join` accepts.
    public static let maxWorldSize = 1024

    /// Values given on the command line; each replaces the environment's.
    public struct Overrides: Sendable {
        public var rank: Int?
        public var worldSize: Int?
        public var localRank: Int?
        public var masterAddr: String?
        public var masterPort: Int?
        public init(rank: Int? = nil, worldSize: Int? = nil, localRank: Int? = nil, masterAddr: String? = nil, masterPort: Int? = nil) {
            self.rank = rank; self.worldSize = worldSize; self.localRank = localRank
            self.masterAddr = masterAddr; self.masterPort = masterPort
        }
        var isEmpty: Bool { rank == nil && worldSize == nil && localRank == nil && masterAddr == nil && masterPort == nil }
    }

    /// Compute threads for this process when none are asked for, and why: the CPUs the launcher reserved
    /// per process (SLURM's `--cpus-per-task`, at most the `allowedCPUs` it may run on); else its share of
    /// the allowed CPUs, divided among the job's processes on this host (one when the launcher does not
    /// say). At least 1.
    public func threadShare(allowedCPUs: Int) -> (threads: Int, reason: String) {
        if let cpusPerProcess {
            return (max(1, min(allowedCPUs, cpusPerProcess)), "SLURM_CPUS_PER_TASK=\(cpusPerProcess), \(allowedCPUs) allowed CPU(s)")
        }
        let sharing = localWorldSize.map { "\($0) local processes" } ?? "1 process, as the launcher does not say how many share this host"
        return (max(1, allowedCPUs / max(1, localWorldSize ?? 1)), "\(allowedCPUs) allowed CPU(s) / \(sharing)")
    }

    public var description: String {
        "\(source.rawValue): rank \(rank) of \(worldSize) (local rank \(localRank)\(localWorldSize.map { " of \($0)" } ?? "")), "
            + "coordinator \(coordinatorHost):\(coordinatorPort)"
            + (storePort.map { " (MASTER_PORT + 2: torchrun's own store is on \($0))" } ?? "")
    }

    /// Reads the job's layout from `environment`, `overrides` taking precedence. Throws a `ClusterError`
    /// naming the variables when the environment is incomplete, malformed or contradicts itself.
    public static func detect(_ environment: [String: String], overrides: Overrides = Overrides()) throws -> JobEnvironment {
        var reader = Reader(environment: environment)
        var found: JobEnvironment
        if reader.isSet("RANK") {
            found = try reader.torchrun()
        } else if reader.isSet("OMPI_COMM_WORLD_RANK") || reader.isSet("PMIX_RANK") && !reader.isSet("SLURM_PROCID") {
            found = try reader.openMPI()
        } else if reader.isSet("SLURM_PROCID") {
            found = try reader.slurm()
        } else if overrides.rank != nil && overrides.worldSize != nil {
            found = JobEnvironment(source: .flags, rank: 0, worldSize: 1, localRank: 0, localWorldSize: nil,
                                   coordinatorHost: try reader.masterAddr(required: overrides.masterAddr == nil) ?? "",
                                   coordinatorPort: try reader.masterPort())
        } else {
            throw ClusterError("no launcher environment found: none of RANK (torchrun, PyTorchJob), OMPI_COMM_WORLD_RANK or PMIX_RANK "
                + "(mpirun), SLURM_PROCID (srun) is set; run under one of them, or give --rank, --world-size and --master-addr")
        }
        if let v = overrides.rank { found.rank = v }
        if let v = overrides.worldSize { found.worldSize = v }
        if let v = overrides.localRank { found.localRank = v }
        if let v = overrides.masterAddr { found.coordinatorHost = v }
        if let v = overrides.masterPort {
            found.coordinatorPort = v
        } else if found.elastic != nil {
            guard found.coordinatorPort < 65534 else {
                throw ClusterError("MASTER_PORT=\(found.coordinatorPort): under torchrun join listens on MASTER_PORT + 2, which is not a port; "
                    + "give join --master-port, or torchrun another --master-port")
            }
            found.storePort = found.coordinatorPort
            found.coordinatorPort += 2
        }
        try found.check(explicit: !overrides.isEmpty)
        return found
    }

    /// Throws unless the values are consistent: 1 ≤ world ≤ maxWorldSize, 0 ≤ rank < world, a local rank
    /// inside the local size, a host and a port in 1...65535.
    private func check(explicit: Bool) throws {
        let origin = explicit ? "the environment with the flags applied" : "the \(source.rawValue) environment"
        guard (1...Self.maxWorldSize).contains(worldSize) else {
            throw ClusterError("\(origin) gives a world size of \(worldSize); it must be in 1...\(Self.maxWorldSize)")
        }
        guard (0..<worldSize).contains(rank) else { throw ClusterError("\(origin) gives rank \(rank), not in 0..<\(worldSize) (the world size)") }
        guard localRank >= 0, localRank < (localWorldSize ?? worldSize) else {
            throw ClusterError("\(origin) gives local rank \(localRank), not in 0..<\(localWorldSize ?? worldSize)")
        }
        guard !coordinatorHost.isEmpty, !coordinatorHost.contains(where: { $0.isWhitespace || $0 == "/" }) else {
            throw ClusterError("\(origin) gives no usable coordinator host ('\(coordinatorHost)'); set MASTER_ADDR or give --master-addr")
        }
        guard (1...65535).contains(coordinatorPort) else { throw ClusterError("\(origin) gives port \(coordinatorPort), not in 1...65535") }
    }

    /// Reads and checks single variables, naming them in every error.
    private struct Reader {
        var environment: [String: String]

        func isSet(_ name: String) -> Bool { environment[name].map { !$0.isEmpty } ?? false }

        func int(_ name: String, required: Bool = true, context: String) throws -> Int? {
            guard let text = environment[name], !text.isEmpty else {
                if required { throw ClusterError("\(context) is set but \(name) is not: the environment is incomplete") }
                return nil
            }
            guard let value = Int(text.trimmingCharacters(in: .whitespaces)), value >= 0 else {
                throw ClusterError("\(name)=\(text) is not a non-negative integer")
            }
            return value
        }

        func masterAddr(required: Bool, context: String = "") throws -> String? {
            if let host = environment["MASTER_ADDR"], !host.isEmpty { return host }
            if required { throw ClusterError("\(context.isEmpty ? "" : context + " is set but ")MASTER_ADDR is not, and no --master-addr was given: the coordinator's host is unknown") }
            return nil
        }

        func masterPort() throws -> Int {
            guard let text = environment["MASTER_PORT"], !text.isEmpty else { return JobEnvironment.defaultPort }
            guard let port = Int(text), (1...65535).contains(port) else { throw ClusterError("MASTER_PORT=\(text) is not a port in 1...65535") }
            return port
        }

        /// torchrun's convention, and what its agent adds (`detect` then moves the port to `MASTER_PORT + 2`).
        func torchrun() throws -> JobEnvironment {
            let context = "RANK"
            var found = JobEnvironment(
                source: .torchrun, rank: try int("RANK", context: context)!, worldSize: try int("WORLD_SIZE", context: context)!,
                localRank: try int("LOCAL_RANK", required: false, context: context) ?? 0,
                localWorldSize: try int("LOCAL_WORLD_SIZE", required: false, context: context),
                coordinatorHost: try masterAddr(required: false) ?? "", coordinatorPort: try masterPort())
            found.elastic = try torchElastic()
            return found
        }

        /// What torchrun's agent sets (`TORCHELASTIC_RESTART_COUNT`, `TORCHELASTIC_MAX_RESTARTS`,
        /// `TORCHELASTIC_RUN_ID`, …); nil when no `TORCHELASTIC_*` variable is set.
        func torchElastic() throws -> TorchElastic? {
            guard environment.contains(where: { $0.key.hasPrefix("TORCHELASTIC_") && !$0.value.isEmpty }) else { return nil }
            let context = "TORCHELASTIC_RESTART_COUNT"
            return TorchElastic(restartCount: try int("TORCHELASTIC_RESTART_COUNT", required: false, context: context) ?? 0,
                                maxRestarts: try int("TORCHELASTIC_MAX_RESTARTS", required: false, context: context),
                                runID: environment["TORCHELASTIC_RUN_ID"].flatMap { $0.isEmpty ? nil : $0 })
        }

        func openMPI() throws -> JobEnvironment {
            let ompi = try int("OMPI_COMM_WORLD_RANK", required: false, context: "")
            let pmix = try int("PMIX_RANK", required: false, context: "")
            if let ompi, let pmix, ompi != pmix {
                throw ClusterError("OMPI_COMM_WORLD_RANK=\(ompi) and PMIX_RANK=\(pmix) contradict each other")
            }
            let context = ompi != nil ? "OMPI_COMM_WORLD_RANK" : "PMIX_RANK"
            let size = try int("OMPI_COMM_WORLD_SIZE", required: false, context: context) ?? int("PMIX_SIZE", required: false, context: context)
            guard let size else {
                throw ClusterError("\(context) is set but OMPI_COMM_WORLD_SIZE is not: the environment is incomplete")
            }
            return JobEnvironment(
                source: .openMPI, rank: (ompi ?? pmix)!, worldSize: size,
                localRank: try int("OMPI_COMM_WORLD_LOCAL_RANK", required: false, context: context) ?? 0,
                localWorldSize: try int("OMPI_COMM_WORLD_LOCAL_SIZE", required: false, context: context),
                coordinatorHost: try masterAddr(required: false) ?? "", coordinatorPort: try masterPort())
        }

        func slurm() throws -> JobEnvironment {
            let context = "SLURM_PROCID"
            let size = try int("SLURM_NTASKS", required: false, context: context) ?? int("SLURM_NPROCS", required: false, context: context)
            guard let size else { throw ClusterError("SLURM_PROCID is set but SLURM_NTASKS is not: the environment is incomplete") }
            var host = try masterAddr(required: false)
            if host == nil, let list = environment["SLURM_JOB_NODELIST"] ?? environment["SLURM_NODELIST"], !list.isEmpty {
                do { host = try expandHostList(list, limit: 1).first } catch { throw ClusterError("SLURM_JOB_NODELIST: \(error)") }
            }
            guard let host else {
                throw ClusterError("SLURM_PROCID is set but neither SLURM_JOB_NODELIST nor MASTER_ADDR is: the coordinator's host is unknown")
            }
            var localSize = try int("SLURM_NTASKS_PER_NODE", required: false, context: context)
            if localSize == nil, let perNode = environment["SLURM_TASKS_PER_NODE"] {
                // "2(x3),1": the first node's count is enough for a share of the CPUs.
                localSize = Int(perNode.prefix { $0.isNumber })
            }
            return JobEnvironment(
                source: .slurm, rank: try int("SLURM_PROCID", context: context)!, worldSize: size,
                localRank: try int("SLURM_LOCALID", required: false, context: context) ?? 0, localWorldSize: localSize,
                coordinatorHost: host, coordinatorPort: try masterPort(),
                cpusPerProcess: try int("SLURM_CPUS_PER_TASK", required: false, context: context))
        }
    }
}

/// Expands a SLURM host list (`node[01-04,07],gpu3,rack[1-2]-n[1-2]`) into host names, in order, at
/// most `limit` of them. Ranges keep the zero padding of their lower bound. Throws a description of
/// what is malformed (unbalanced or nested brackets, an empty element, a range that runs backwards or
/// is not numeric). Only the first `limit` names are generated, so `node[0-999999999]` costs nothing.
public func expandHostList(_ list: String, limit: Int = 4096) throws -> [String] {
    // Split at commas outside brackets.
    var patterns = [String](), current = "", depth = 0
    for ch in list {
        switch ch {
        case "[": depth += 1; guard depth == 1 else { throw ClusterError("nested '[' in '\(list)'") }
        case "]": depth -= 1; guard depth == 0 else { throw ClusterError("']' without '[' in '\(list)'") }
        case "," where depth == 0: patterns.append(current); current = ""; continue
        default: break
        }
        current.append(ch)
    }
    guard depth == 0 else { throw ClusterError("unclosed '[' in '\(list)'") }
    patterns.append(current)

    var hosts = [String]()
    for pattern in patterns {
        guard !pattern.isEmpty else { throw ClusterError("empty host name in '\(list)'") }
        // Alternate literal text and bracket groups: prefix [a-b,c] middle [d] suffix.
        var parts = [[String]]()
        var rest = Substring(pattern)
        while let open = rest.firstIndex(of: "[") {
            parts.append([String(rest[..<open])])
            let close = rest[open...].firstIndex(of: "]")!
            var choices = [String]()
            for item in rest[rest.index(after: open)..<close].split(separator: ",", omittingEmptySubsequences: false) {
                let bounds = item.split(separator: "-", omittingEmptySubsequences: false)
                guard (1...2).contains(bounds.count), bounds.allSatisfy({ !$0.isEmpty && $0.allSatisfy(\.isASCII) && $0.allSatisfy(\.isNumber) }),
                      let low = Int(bounds[0]), let high = Int(bounds.last!), low <= high else {
                    throw ClusterError("'\(item)' in '\(pattern)' is not a number or an ascending range a-b")
                }
                let width = bounds[0].count
                for n in low...high {
                    choices.append(String(repeating: "0", count: max(0, width - String(n).count)) + String(n))
                    if choices.count > limit { break }
                }
            }
            parts.append(choices)
            rest = rest[rest.index(after: close)...]
        }
        parts.append([String(rest)])
        // The cartesian product, first group slowest, stopping at the limit.
        func expand(_ i: Int, _ prefix: String) -> Bool {
            if hosts.count >= limit { return false }
            if i == parts.count { hosts.append(prefix); return true }
            for choice in parts[i] where !expand(i + 1, prefix + choice) { return false }
            return true
        }
        _ = expand(0, "")
        if hosts.count >= limit { break }
    }
    return hosts
}
