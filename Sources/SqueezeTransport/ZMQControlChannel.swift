// The control plane over ZeroMQ: the coordinator's ROUTER and a worker's DEALER, CURVE on both.

import Foundation
import SqueezeSystem

/// The largest control frame either end accepts; a larger one disconnects its sender. The largest
/// real one is `start` with every worker's endpoint (about 50 bytes each, 1,024 workers at most).
public let controlFrameLimit = 256 << 10

/// The coordinator's end of the control plane over ZeroMQ: a ROUTER socket that knows each peer
/// by its ZeroMQ identity. Counts every byte it moves.
public final class ZMQControlServer: ControlServerChannel {
    let socket: ZMQSocket
    public let endpoint: String
    public private(set) var bytesSent = 0, bytesReceived = 0

    private let monitor: HandshakeMonitor
    private let refusals: RateLimitedLog
    /// The peer whose frames last came in on each connection's descriptor (`droppedPeers`).
    private var owners = [Int32: [UInt8]]()

    /// `log` gets a line (at most one per 5 s) about connections refused at the handshake.
    public init(context: ZMQContext, bind: String, security: PeerSecurity, log: @escaping (String) -> Void = { _ in }) throws {
        refusals = RateLimitedLog(interval: .seconds(5), log)
        socket = try ZMQSocket(context: context, type: .router)
        monitor = try HandshakeMonitor(socket)
        try socket.setRouterHandover(false)  // a second connection with a live peer's identity is refused, not handed its rank
        try socket.setMaxMessageSize(controlFrameLimit)
        try socket.setReceiveHighWaterMark(1_000)
        try socket.secureAsServer(security)
        do { try socket.bind(bind) } catch {
            // Best effort: who holds the port (/proc), when the bind found it taken.
            let port = bind.hasPrefix("tcp://") && "\(error)".contains("in use") ? bind.split(separator: ":").last.flatMap { Int($0) } : nil
            let holder = port.flatMap { p in tcpListener(port: p).map { "; port \(p) is held by \($0)" } } ?? ""
            throw ControlChannelError("cannot bind the coordinator to \(bind): \(error)\(holder)")
        }
        endpoint = try socket.lastEndpoint
    }

    /// The next frame from any peer, or nil after `timeout`. Frames that are not [identity, body] are dropped.
    public func receive(timeout: Duration) throws -> (peer: [UInt8], frame: [UInt8])? {
        if let last = monitor.update() {
            refusals.line("refused a connection: \(last) (\(monitor.failed) refused so far)")
        }
        guard let parts = try socket.receiveMultipart(timeout: timeout) else { return nil }
        let size = parts.reduce(0) { $0 + $1.count }
        bytesReceived += size
        // Copy inside withUnsafeBytes: a frame's bytes live in its message (inline for small ones),
        // which must not be freed before the copy is made.
        let id = parts[0].withUnsafeBytes { Array($0) }
        owners[parts[parts.count - 1].sourceDescriptor] = id  // a frame from the wire (the identity frame is the socket's own)
        guard parts.count == 2 else { return (id, []) }
        return (id, parts[1].withUnsafeBytes { Array($0) })
    }

    /// The peers whose connections dropped since the previous call (a process that exited or was
    /// killed): the monitor names the descriptor, the last frame read from it names the peer.
    public func droppedPeers() -> [[UInt8]] {
        monitor.takeDisconnected().compactMap { owners.removeValue(forKey: $0) }
    }

    public func send(_ frame: [UInt8], to peer: [UInt8]) {
        peer.withUnsafeBytes { id in
            frame.withUnsafeBytes { b in
                // A peer that has gone away is not an error here: the caller learns of it from silence.
                _ = try? socket.sendMultipart([id, b])
            }
        }
        bytesSent += peer.count + frame.count
    }

    public func close() {
        monitor.close()
        socket.close(linger: .milliseconds(200))
        // libzmq unlinks an ipc socket file only if its I/O thread gets to it before the process ends.
        if endpoint.hasPrefix("ipc://") { unlink(String(endpoint.dropFirst(6))) }
    }
}

/// A worker's end of the control plane over ZeroMQ: a DEALER connected to the coordinator.
public final class ZMQControlClient: ControlClientChannel {
    let socket: ZMQSocket
    public private(set) var bytesSent = 0, bytesReceived = 0
    private let linger: Duration
    private let monitor: HandshakeMonitor

    /// `identity`: the routing id the coordinator knows this connection by.
    public init(context: ZMQContext, coordinator: String, identity: [UInt8], security: PeerSecurity,
                linger: Duration = .milliseconds(500)) throws {
        self.linger = linger
        socket = try ZMQSocket(context: context, type: .dealer)
        try socket.setRoutingID(identity)
        try socket.setMaxMessageSize(controlFrameLimit)
        try socket.secureAsClient(security)
        monitor = try HandshakeMonitor(socket)
        do { try socket.connect(coordinator) } catch {
            throw ControlChannelError("cannot connect to the coordinator at \(coordinator): \(error)")
        }
    }

    public var handshakeFailure: String? { monitor.succeeded == 0 ? monitor.failure : nil }

    public func send(_ frame: [UInt8]) throws {
        try frame.withUnsafeBytes { _ = try socket.send($0) }
        bytesSent += frame.count
    }

    public func trySend(_ frame: [UInt8]) {
        if (frame.withUnsafeBytes { (try? socket.send($0, dontWait: true)) ?? false }) { bytesSent += frame.count }
    }

    public func receive(timeout: Duration) throws -> [UInt8]? {
        guard let message = try socket.receive(timeout: timeout) else { return nil }
        bytesReceived += message.count
        return message.withUnsafeBytes { Array($0) }
    }

    public func close() {
        monitor.close()
        socket.close(linger: linger)
    }
}

/// Connections to a coordinator over ZeroMQ, sharing one context.
public struct ZMQControlConnector: ControlConnector, @unchecked Sendable {
    // @unchecked Sendable: ZMQContext is thread-safe.
    public let context: ZMQContext
    public let coordinator: String
    public let security: PeerSecurity
    public init(context: ZMQContext, coordinator: String, security: PeerSecurity) {
        self.context = context; self.coordinator = coordinator; self.security = security
    }
    public func connect(identity: [UInt8]) throws -> any ControlClientChannel {
        try ZMQControlClient(context: context, coordinator: coordinator, identity: identity, security: security)
    }
}

/// A control socket that cannot bind or connect: where, and why.
public struct ControlChannelError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Who listens on TCP `port` in this network namespace, best effort: the listening sockets' inodes
/// from /proc/net/tcp and tcp6, then the process holding one among /proc/*/fd, as
/// "pid 812 (python3 /tmp/pt/bin/torchrun --nproc-per-node 2 …)". nil when nothing listens there.
public func tcpListener(port: Int) -> String? {
    var inodes = Set<String>()
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        guard let text = try? String(contentsOfFile: table, encoding: .utf8) else { continue }
        for line in text.split(separator: "\n").dropFirst() {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count > 9, f[3] == "0A", let colon = f[1].lastIndex(of: ":"),
                  Int(f[1][f[1].index(after: colon)...], radix: 16) == port else { continue }
            inodes.insert(String(f[9]))
        }
    }
    guard !inodes.isEmpty else { return nil }
    let targets = Set(inodes.map { "socket:[\($0)]" })
    let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).filter { Int($0) != nil }
    for pid in pids {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        for fd in fds {
            guard let link = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)"), targets.contains(link) else { continue }
            let raw = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline"))) ?? Data()
            var command = String(decoding: raw, as: UTF8.self).split(whereSeparator: { $0 == "\0" || $0.isNewline }).joined(separator: " ")
            if command.count > 160 { command = String(command.prefix(160)) + "…" }
            return "pid \(pid) (\(command.isEmpty ? "command line unknown" : command))"
        }
    }
    return "a process this user cannot see (another user's, or outside this PID namespace)"
}
