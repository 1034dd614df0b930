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
    func close()
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
    func close()
}

/// Opens connections to one coordinator: a worker's main channel and its heartbeat channel.
public protocol ControlConnector: Sendable {
    /// The coordinator's address, for messages.
    var coordinator: String { get }
    func connect() throws -> any ControlClientChannel
}
