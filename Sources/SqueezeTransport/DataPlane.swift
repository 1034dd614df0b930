// Where a rank's data-plane transport comes from: ZeroMQ sockets in a process, an
// `InProcessGroup` in tests. The coordinator (star hub) and the workers receive a factory.

import Foundation

/// The medium of the data plane between ranks. On the wire (the control protocol's `Welcome`)
/// it is the raw value, "tcp" or "ipc".
public enum DataTransportKind: String, Codable, Sendable, CaseIterable {
    case tcp, ipc
}

/// What protects the data plane's frames: the `protection` of the benchmarks' JSON and of `launch`'s start line.
public enum DataProtection: String, Codable, Sendable {
    /// CURVE on every data-plane socket (every socket's protection before the sealed data plane;
    /// `bench allreduce --curve-data-plane` measures it).
    case curve
    /// Plain sockets, every frame sealed with AES-256-GCM (Seal.swift): a tcp data plane of a run with a key.
    case aesGCM = "aes-gcm"
    /// Nothing: `--insecure`, or ipc sockets in the private directory only this user can enter.
    case none

    /// What a data plane over `kind` gets in a run whose sockets have `security`.
    public init(security: PeerSecurity, kind: DataTransportKind) { self.init(keyed: security.isEncrypted, kind: kind) }

    /// What a data plane over `kind` gets in a run with a key (`keyed`) or without one.
    public init(keyed: Bool, kind: DataTransportKind) { self = keyed && kind == .tcp ? .aesGCM : .none }
}

/// A transport that binds on creation and connects once every rank's endpoint is known.
public protocol DataPlaneTransport: Transport {
    /// Give this to the peers that must connect here.
    var boundEndpoint: String { get }
    func connect(topology: Topology, endpoints: [String]) throws
    /// Ends a blocked receive promptly once set (`CommError.interrupted`); nil: receives wait out their timeout.
    var interruption: Interruption? { get set }
    /// Flushes what is still queued (up to `flushTimeout`) and closes.
    func close(flushTimeout: Duration)
}

extension ZMQTransport: DataPlaneTransport {}

/// Makes rank `rank`'s transport of a group of `worldSize`.
public protocol DataPlaneFactory: Sendable {
    /// `maxFrameBytes`: the largest frame a peer may send it (`dataFrameLimit`); larger ones disconnect the sender.
    /// `salt`: the rendezvous's data-plane salt (the welcome's), from which a sealed data plane derives its keys.
    func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind, maxFrameBytes: Int, salt: [UInt8]?) throws -> any DataPlaneTransport
}

/// The largest data-plane frame for buckets of at most `largestBucket` floats: a sparse top-k chunk
/// (an index and a value per entry, 8 bytes) of a whole bucket, plus room for headers.
public func dataFrameLimit(largestBucket: Int) -> Int { 8 * largestBucket + 4096 }

/// The one place the ipc:// path of a local endpoint is spelled: `tag` names the rank ("rank0",
/// "hub"); the process id keeps concurrent runs apart. The socket lives in `privateSocketDirectory()`.
public func ipcEndpoint(_ tag: String, pid: Int32 = getpid()) throws -> String {
    "ipc://\(try privateSocketDirectory())/\(pid)-\(tag).ipc"
}

/// `$TMPDIR/squeezetrain-UID`, mode 0700: only this user can reach the ipc sockets inside (ipc
/// endpoints are files; their permissions are the directory's). Made if missing; refused if it is
/// a symbolic link, another user's, or open to others.
public func privateSocketDirectory() throws -> String {
    let uid = getuid()
    let path = NSTemporaryDirectory() + "squeezetrain-\(uid)"
    if mkdir(path, 0o700) != 0 && errno != EEXIST {
        throw CommError.invalidArgument("cannot create the socket directory \(path): \(String(cString: strerror(errno)))")
    }
    var info = stat()
    guard lstat(path, &info) == 0 else { throw CommError.invalidArgument("cannot inspect \(path): \(String(cString: strerror(errno)))") }
    guard info.st_mode & S_IFMT == S_IFDIR, info.st_uid == uid, info.st_mode & 0o077 == 0 else {
        throw CommError.invalidArgument("the socket directory \(path) is not a private directory of user \(uid) (mode \(String(info.st_mode & 0o7777, radix: 8)), "
                                        + "owner \(info.st_uid)); remove it, and squeezetrain makes it again with mode 0700")
    }
    return path
}

/// Why `endpoint` is not an ipc socket inside `privateSocketDirectory()` (as text that follows the
/// endpoint), or nil when it is. An abstract socket (`ipc://@name`) has no permissions at all, and one
/// outside the directory has the umask's.
public func privateIPCProblem(_ endpoint: String) -> String? {
    guard endpoint.hasPrefix("ipc://") else { return "is not an ipc socket" }
    let path = String(endpoint.dropFirst("ipc://".count))
    if path.hasPrefix("@") { return "is an abstract ipc socket, which has no permissions: any local user can connect to it" }
    let directory: String
    do { directory = try privateSocketDirectory() } catch { return "cannot be checked: \(error)" }
    let parent = (path as NSString).deletingLastPathComponent
    guard path.hasPrefix("/"), let inside = resolved(parent), inside == resolved(directory) else {
        return "is outside \(directory), the private directory only this user can enter"
    }
    return nil
}

/// `path` with every symbolic link and `..` resolved (realpath(3)), or nil if it does not exist.
private func resolved(_ path: String) -> String? {
    guard let real = realpath(path, nil) else { return nil }
    defer { free(real) }
    return String(cString: real)
}

/// The refusal of a socket that a run without a key would open outside the private directory:
/// `socket` names it ("the control socket ipc:///tmp/x.ipc is outside …").
public func privateIPCRefusal(_ socket: String) -> String {
    let directory = (try? privateSocketDirectory()) ?? NSTemporaryDirectory() + "squeezetrain-\(getuid())"
    return "\(socket), and this run has no key: give every process the same --key-file FILE (make one with squeezetrain keygen --output FILE), "
        + "or --insecure to let anyone who reaches the sockets join the run; a run without either must keep every socket, control "
        + "and data plane (--transport ipc), inside \(directory)"
}

/// ZeroMQ transports: tcp on `host` (an ephemeral port), or ipc in the private socket directory.
/// With a run key, tcp frames are sealed (AES-256-GCM on plain sockets) and ipc ones go plain
/// (only this user can reach the directory, and this user can read the key anyway); CURVE stays on
/// the control plane. Without a key (`--insecure`, `.privateIPC`) nothing is sealed.
public final class ZMQDataPlane: DataPlaneFactory, @unchecked Sendable {
    // @unchecked Sendable: immutable after init but `made`, guarded by `lock`; ZMQContext is thread-safe.
    private let context: ZMQContext
    private let host: @Sendable () throws -> String
    private let options: ZMQTransport.Options
    /// The ipc tag of the hub (the coordinator) rather than a rank number, for the last rank of a star.
    private let hubRank: Int?
    private let lock = NSLock()
    /// Transports made so far: an elastic run's later data planes get ipc paths of their own, which a
    /// peer of an earlier one (a worker that hung and woke up) cannot reach.
    private var made = 0

    /// `host` is asked only for tcp (it may resolve a route).
    public init(context: ZMQContext, host: @escaping @Sendable () throws -> String, options: ZMQTransport.Options = .init(),
                hubRank: Int? = nil) {
        self.context = context; self.host = host; self.options = options; self.hubRank = hubRank
    }

    public func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind, maxFrameBytes: Int, salt: [UInt8]?) throws -> any DataPlaneTransport {
        if options.security == .privateIPC && kind != .ipc {
            throw CommError.invalidArgument(privateIPCRefusal("the coordinator asks for a \(kind.rawValue) data plane (its --transport \(kind.rawValue)), which would listen in plain text"))
        }
        let generation = lock.withLock { defer { made += 1 }; return made }
        let tag = (rank == hubRank ? "hub" : "rank\(rank)") + (generation == 0 ? "" : "-\(generation)")
        let bind = kind == .ipc ? try ipcEndpoint(tag) : "tcp://\(try host()):*"
        var options = options
        options.maxMessageBytes = maxFrameBytes
        if case .curve(let key) = options.security {
            if kind == .tcp {
                guard let salt else {
                    throw CommError.invalidArgument("the coordinator's welcome carries no data-plane salt, so the tcp data plane cannot be sealed: "
                                                    + "is the coordinator an older build? (run the same build everywhere)")
                }
                options.seal = try DataPlaneSeal(key: key, salt: salt)
                options.security = .insecure
            } else {
                options.security = .privateIPC
            }
        }
        return try ZMQTransport(rank: rank, worldSize: worldSize, bind: bind, context: context, options: options)
    }
}

/// In-process transports for tests: every rank of one group shares an `InProcessGroup`, made when
/// the first rank asks. One factory serves one run.
public final class InProcessDataPlane: DataPlaneFactory, @unchecked Sendable {
    // @unchecked Sendable: `group` is guarded by `lock`.
    private let lock = NSLock()
    private var group: InProcessGroup?
    /// Wraps each transport handed out (e.g. to inject faults); identity by default.
    private let wrap: @Sendable (InProcessTransport) -> any DataPlaneTransport

    public init(wrap: @escaping @Sendable (InProcessTransport) -> any DataPlaneTransport = { $0 }) { self.wrap = wrap }

    public func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind, maxFrameBytes: Int, salt: [UInt8]?) throws -> any DataPlaneTransport {
        let g = lock.withLock { () -> InProcessGroup in
            if let group, group.worldSize == worldSize { return group }
            let made = InProcessGroup(worldSize: worldSize)
            group = made
            return made
        }
        return wrap(g[rank])
    }
}

extension InProcessTransport: DataPlaneTransport {
    public var boundEndpoint: String { "inproc://rank\(rank)" }
    /// Every rank of the group is reachable already.
    public func connect(topology: Topology, endpoints: [String]) throws {}
    public func close(flushTimeout: Duration) {}
}
