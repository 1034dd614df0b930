// The control plane's two ends, independent of the medium (ZeroMQ in SqueezeCluster, in-process
// here for tests). Frames are opaque bytes; SqueezeCluster's `ControlMessage` gives them meaning.

/// The coordinator's end: frames from and to peers, each known by an opaque identity (ZeroMQ's
/// routing id, or the in-process twin's connection number). Counts every byte it moves.
public protocol ControlServerChannel: AnyObject {
    /// Where workers connect (the bound endpoint, wildcards resolved).
    var endpoint: String { get }
    var bytesSent: Int { get }
    var bytesReceived: Int { get }
    /// The next frame from any peer, or nil after `timeout` (zero: don't wait).
    func receive(timeout: Duration) throws -> (peer: [UInt8], frame: [UInt8])?
    /// Best effort: a peer that has gone away is not an error here (its silence tells).
    func send(_ frame: [UInt8], to peer: [UInt8])
    /// The peers whose connections dropped since the previous call, as far as the medium can tell.
    func droppedPeers() -> [[UInt8]]
    func close()
}

extension ControlServerChannel {
    /// A medium that cannot tell: silence alone shows a lost peer.
    public func droppedPeers() -> [[UInt8]] { [] }
}

/// A worker's end: one connection to the coordinator.
public protocol ControlClientChannel: AnyObject {
    var bytesSent: Int { get }
    var bytesReceived: Int { get }
    func send(_ frame: [UInt8]) throws
    /// Sends without ever blocking; a frame that cannot go now is dropped (heartbeats).
    func trySend(_ frame: [UInt8])
    /// The next frame from the coordinator, or nil after `timeout` (zero: don't wait).
    func receive(timeout: Duration) throws -> [UInt8]?
    /// Why the coordinator refused this connection at the handshake (no key, another key), while no
    /// handshake has succeeded; nil otherwise.
    var handshakeFailure: String? { get }
    func close()
}

/// Opens connections to one coordinator: a worker's main channel and its heartbeat channel.
public protocol ControlConnector: Sendable {
    /// The coordinator's address, for messages.
    var coordinator: String { get }
    /// A connection the coordinator knows by `identity` (1–255 bytes, not starting with 0).
    func connect(identity: [UInt8]) throws -> any ControlClientChannel
}

/// A worker's control identities: a random session id, one byte for its main connection and
/// another for its heartbeat connection, so the coordinator can tell that a heartbeat comes from
/// the process that holds the rank (and nobody can guess the id to speak for it).
public enum ControlIdentity {
    public static let main: UInt8 = 0x6d, heartbeat: UInt8 = 0x68  // "m", "h"

    /// A fresh random session: 16 bytes, the first never 0 (ZeroMQ reserves those ids).
    public static func newSession() -> [UInt8] {
        var session = (0..<16).map { _ in UInt8.random(in: 0...255) }
        session[0] = UInt8.random(in: 1...255)
        return session
    }

    /// The heartbeat connection's identity of the session a main identity belongs to.
    public static func heartbeatIdentity(ofMain id: [UInt8]) -> [UInt8] { Array(id.dropLast()) + [heartbeat] }

    /// The main connection's identity of the session a heartbeat identity belongs to, if it is one.
    public static func mainIdentity(ofHeartbeat id: [UInt8]) -> [UInt8]? {
        guard id.count == 17, id.last == heartbeat else { return nil }
        return Array(id.dropLast()) + [main]
    }
}
