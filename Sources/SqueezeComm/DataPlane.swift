// Where a rank's data-plane transport comes from: ZeroMQ sockets in a process, an
// `InProcessGroup` in tests. The coordinator (star hub) and the workers receive a factory.

import Foundation

/// The medium of the data plane between ranks. On the wire (the control protocol's `Welcome`)
/// it is the raw value, "tcp" or "ipc".
public enum DataTransportKind: String, Codable, Sendable, CaseIterable {
    case tcp, ipc
}

/// A transport that binds on creation and connects once every rank's endpoint is known.
public protocol DataPlaneTransport: Transport {
    /// Give this to the peers that must connect here.
    var boundEndpoint: String { get }
    func connect(topology: Topology, endpoints: [String]) throws
    /// Flushes what is still queued (up to `flushTimeout`) and closes.
    func close(flushTimeout: Duration)
}

extension ZMQTransport: DataPlaneTransport {}

/// Makes rank `rank`'s transport of a group of `worldSize`.
public protocol DataPlaneFactory: Sendable {
    func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind) throws -> any DataPlaneTransport
}

/// The one place the ipc:// path of a local endpoint is spelled: `tag` names the rank ("rank0",
/// "hub"); the process id keeps concurrent runs apart.
public func ipcEndpoint(_ tag: String, pid: Int32 = getpid()) -> String {
    "ipc://\(NSTemporaryDirectory())squeezetrain-\(pid)-\(tag).ipc"
}

/// ZeroMQ transports: tcp on `host` (an ephemeral port), or ipc in the temporary directory.
public final class ZMQDataPlane: DataPlaneFactory, @unchecked Sendable {
    // @unchecked Sendable: immutable after init; ZMQContext is thread-safe.
    private let context: ZMQContext
    private let host: @Sendable () throws -> String
    private let options: ZMQTransport.Options
    /// The ipc tag of the hub (the coordinator) rather than a rank number, for the last rank of a star.
    private let hubRank: Int?

    /// `host` is asked only for tcp (it may resolve a route).
    public init(context: ZMQContext, host: @escaping @Sendable () throws -> String, options: ZMQTransport.Options = .init(),
                hubRank: Int? = nil) {
        self.context = context; self.host = host; self.options = options; self.hubRank = hubRank
    }

    public func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind) throws -> any DataPlaneTransport {
        let bind = kind == .ipc ? ipcEndpoint(rank == hubRank ? "hub" : "rank\(rank)") : "tcp://\(try host()):*"
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

    public func makeTransport(rank: Int, worldSize: Int, kind: DataTransportKind) throws -> any DataPlaneTransport {
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
