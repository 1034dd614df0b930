// The processes of a cluster run: who may connect, a coordinator or worker process as one Codable
// value, and what each needs around its state machine (ZeroMQ context, authentication, descriptor
// limit, signals, CPU binding); also the coordinator on a thread of its own (rank 0 of `join`).

import Foundation
import SqueezeCollectives
import SqueezeTransport
import SqueezeData
import SqueezeEngine
import SqueezeSystem
import SqueezeTraining

/// Who may connect to a process's sockets: holders of the run key in `keyFile`, anyone (`insecure`),
/// or, with neither, only this user through the private ipc directory.
public struct PeerAccess: Codable, Sendable, Equatable {
    /// The run key (`keygen`); nil: none given.
    public var keyFile: String?
    public var insecure: Bool
    public init(keyFile: String? = nil, insecure: Bool = false) { self.keyFile = keyFile; self.insecure = insecure }

    /// The sockets' security: the key's, or plain with `insecure`. Without either, only a run whose every
    /// socket is an ipc socket in this user's private directory (`privateSocketDirectory()`) may go on:
    /// `endpoint` (the control socket) must be one, and so must the data plane, `transport` (the
    /// coordinator's; a worker's data plane refuses tcp when it learns it). Anything else is refused,
    /// naming the socket.
    public func security(endpoint: String, transport: DataTransportKind? = nil) throws -> PeerSecurity {
        if insecure { return .insecure }
        if let keyFile { return .curve(try RunKey.read(from: keyFile)) }
        if !endpoint.hasPrefix("ipc://") {
            throw ClusterError("\(endpoint) is a network endpoint, and this run has no key: give every process the same --key-file FILE "
                               + "(make one with squeezetrain keygen --output FILE), or --insecure to let anyone who reaches the port join the run")
        }
        if let problem = privateIPCProblem(endpoint) { throw ClusterError(privateIPCRefusal("the control socket \(endpoint) \(problem)")) }
        if let transport, transport != .ipc {
            throw ClusterError(privateIPCRefusal("the data plane (--transport \(transport.rawValue)) would listen in plain text on \(transport.rawValue)"))
        }
        return .privateIPC
    }
}

/// A coordinator process: what `coordinator`'s flags say, and what `launch` and `bench cluster` hand
/// theirs in a file (`--config`).
public struct CoordinatorProcess: Codable, Sendable {
    public var options: CoordinatorOptions
    public var access: PeerAccess
    /// The star hub's timeline (nil: none) and the steps it records.
    public var trace: String?
    public var traceWindow: TraceWindow
    public init(options: CoordinatorOptions, access: PeerAccess, trace: String? = nil, traceWindow: TraceWindow) {
        self.options = options; self.access = access; self.trace = trace; self.traceWindow = traceWindow
    }
}

/// A worker process: what `worker`'s flags say, and what `launch` and `bench cluster` hand theirs in a file.
public struct WorkerProcess: Codable, Sendable {
    /// The coordinator's control endpoint.
    public var coordinator: String
    public var options: WorkerOptions
    public var access: PeerAccess
    /// The address other workers reach this one at (nil: the local address on the route to the coordinator).
    public var advertise: String?
    /// The CPUs this process runs on, as `--cpus` takes them (nil: wherever the scheduler puts it).
    public var cpus: String?
    public init(coordinator: String, options: WorkerOptions, access: PeerAccess, advertise: String? = nil, cpus: String? = nil) {
        self.coordinator = coordinator; self.options = options; self.access = access; self.advertise = advertise; self.cpus = cpus
    }
}

/// A process's configuration as a JSON file, written by its launcher into a private directory.
public enum ProcessConfigFile {
    public static func write<T: Encodable>(_ value: T, to path: String) throws {
        try AtomicFile.write(Array(try JSONEncoder().encode(value)), to: path)
    }

    /// The value in `path`; an error names the file and what is wrong with it.
    public static func read<T: Decodable>(_ type: T.Type, from path: String) throws -> T {
        let bytes = try readFileNoFollow(path)
        do { return try JSONDecoder().decode(type, from: Data(bytes)) } catch {
            throw ClusterError("--config \(path) is not a \(type) written by this version of squeezetrain (\(error))")
        }
    }
}

/// What a cluster process does around its coordinator or worker: the ZeroMQ context and its
/// authentication, the descriptor limit, signals, compute threads and CPU binding.
public enum ClusterRuntime {
    /// Runs a coordinator process until the run ends.
    public static func run(_ process: CoordinatorProcess, events: @escaping (ClusterEvent) -> Void,
                           log: @escaping (String) -> Void) throws -> ClusterSummary {
        ProcessGroup.endWithLauncher()
        var options = process.options
        let security = try process.access.security(endpoint: options.bind, transport: options.transport)
        options.tracer = process.trace.map { Tracer(path: $0, pid: options.workers, processName: "star hub (coordinator)", window: process.traceWindow) }
        return try runCoordinator(options, security: security, stop: stopOnSignals(), events: events, log: log)
    }

    /// Runs a worker process until the run ends.
    public static func run(_ process: WorkerProcess, events: @escaping (ClusterEvent) -> Void, log: @escaping (String) -> Void) throws {
        ProcessGroup.endWithLauncher()
        // Before any thread starts (compute, loader, libzmq I/O): they inherit the binding.
        if let cpus = process.cpus {
            do { try CPUAffinity.bindCurrentThread(to: try CPUAffinity.parseList(cpus)) } catch { throw ClusterError("--cpus \(cpus): \(error)") }
            log("bound to CPU(s) \(CPUAffinity.allowedCPUs().map(String.init).joined(separator: ","))")
        }
        let signals = stopOnSignals()
        ComputeThreads.set(process.options.threads)
        let (advertise, coordinator) = (process.advertise, process.coordinator)
        try runWorker(coordinator: coordinator, options: process.options, dataHost: { try advertise ?? localAddress(towards: coordinator) },
                      security: try process.access.security(endpoint: coordinator), signals: signals, events: events, log: log)
    }

    /// Runs a coordinator until the run ends; `stop` takes the signals; `hubHost` is the address the star
    /// hub's data plane binds (default: the local address on the route to the bound endpoint).
    public static func runCoordinator(_ options: CoordinatorOptions, security: PeerSecurity, stop: StopToken,
                                      hubHost: (@Sendable () throws -> String)? = nil, events: @escaping (ClusterEvent) -> Void = { _ in },
                                      log: @escaping (String) -> Void) throws -> ClusterSummary {
        defer { writeTrace(options.tracer) }  // after the hub's thread has ended, also after a failure
        let context = try makeContext(security, log: log)
        defer { context.terminate() }
        let server = try ZMQControlServer(context: context, bind: options.bind, security: security, log: log)
        defer { server.close() }
        let endpoint = server.endpoint
        var transportOptions = ZMQTransport.Options()
        transportOptions.security = security
        let dataPlane = ZMQDataPlane(context: context, host: hubHost ?? { try localAddress(towards: endpoint) }, options: transportOptions,
                                     hubRank: options.workers)
        return try Coordinator(options: options, channel: server, dataPlane: dataPlane, stop: stop, events: events, log: log).run()
    }

    /// Runs a worker connected to the control endpoint `coordinator` until the run ends; its data plane
    /// binds on `dataHost()` (asked once the worker has its rank).
    public static func runWorker(coordinator: String, options: WorkerOptions, dataHost: @escaping @Sendable () throws -> String,
                                 security: PeerSecurity, signals: StopToken, events: @escaping (ClusterEvent) -> Void = { _ in },
                                 log: @escaping (String) -> Void) throws {
        let context = try makeContext(security, log: log)
        defer { context.terminate() }
        var transportOptions = ZMQTransport.Options()
        transportOptions.abandonTimeout = .seconds(5)
        transportOptions.security = security
        let dataPlane = ZMQDataPlane(context: context, host: dataHost, options: transportOptions)
        events(ClusterEvent(.joining, endpoint: coordinator))  // `signals` already takes SIGINT and SIGTERM
        try Worker(options: options, control: ZMQControlConnector(context: context, coordinator: coordinator, security: security),
                   dataPlane: dataPlane, signals: signals, events: events, log: log).run()
    }

    /// A ZeroMQ context whose ZAP handler admits `security`'s peers (refusals logged at a bounded rate),
    /// after raising the descriptor limit. A ZAP handler that stops leaves the process unable to admit
    /// its own peers: the process ends, saying why.
    static func makeContext(_ security: PeerSecurity, log: @escaping (String) -> Void) throws -> ZMQContext {
        raiseDescriptorLimit()
        let context = try ZMQContext()
        do {
            try context.authenticate(security, log: { emit("\($0)\n") }, onFailure: {
                FileHandle.standardError.write(Data("squeezetrain: error: \($0)\n".utf8))
                exit(1)
            })
        } catch {
            context.terminate()
            throw error
        }
        if security == .insecure { log("warning: --insecure: no authentication, no encryption; anyone who reaches these ports can join this run") }
        return context
    }

    /// Raises the soft limit on open descriptors to the hard limit (at most 65,536): every connection,
    /// also one that never authenticates, holds a descriptor until its handshake times out, and a
    /// process at its limit can accept no worker (and libzmq's listener spins on EMFILE). A limit that
    /// cannot be read or raised is left as it is.
    static func raiseDescriptorLimit() {
        var limit = rlimit()
        guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        let target = min(limit.rlim_max, 65_536)
        if limit.rlim_cur < target {
            limit.rlim_cur = target
            _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        }
    }

    /// Training records in the data directory (from file sizes), or CIFAR-10's 50,000 when it cannot be found here.
    public static func trainingRecordCount(_ data: String?) -> Int {
        guard let dir = try? CIFAR10.resolveDirectory(explicit: data) else { return 50_000 }
        let bytes = CIFAR10.Split.train.fileNames.reduce(0) { total, name in
            let size = (try? FileManager.default.attributesOfItem(atPath: (dir as NSString).appendingPathComponent(name))[.size] as? Int) ?? 0
            return total + size
        }
        return bytes > 0 ? bytes / CIFAR10.recordSize : 50_000
    }
}

/// The coordinator on a thread of its own (rank 0 of `join`, beside its worker). `wait` returns its
/// summary or its error; `onFailure` runs on the coordinator's thread as soon as it fails (`join` ends
/// the process then: its worker could otherwise wait for the coordinator until its timeouts).
public final class CoordinatorThread: @unchecked Sendable {
    // @unchecked Sendable: `result` is written once, before `done` is signalled, and read after.
    private var result: Result<ClusterSummary, any Error>?
    private let done = DispatchSemaphore(value: 0)

    public init(onFailure: @escaping @Sendable (any Error) -> Void = { _ in }, _ body: @escaping @Sendable () throws -> ClusterSummary) {
        let thread = Thread { [self] in
            result = Result(catching: body)
            if case .failure(let error) = result { onFailure(error) }
            done.signal()
        }
        thread.name = "coordinator"
        thread.start()
    }

    /// The coordinator's summary or error once it has finished, or nil after `timeout`.
    public func wait(timeout: Duration) -> Result<ClusterSummary, any Error>? {
        done.wait(timeout: .now() + Double(timeout.components.seconds)) == .success ? result : nil
    }
}
