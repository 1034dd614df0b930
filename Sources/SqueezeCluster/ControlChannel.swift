import Foundation
import SqueezeComm

/// The coordinator's end of the control plane: a ROUTER socket that knows each peer by its
/// ZeroMQ identity. Counts every byte it moves.
final class ControlServer {
    let socket: ZMQSocket
    let endpoint: String
    private(set) var bytesSent = 0, bytesReceived = 0

    init(context: ZMQContext, bind: String) throws {
        socket = try ZMQSocket(context: context, type: .router)
        try socket.setRouterHandover(true)
        do { try socket.bind(bind) } catch {
            throw ClusterError("cannot bind the coordinator to \(bind): \(error)")
        }
        endpoint = try socket.lastEndpoint
    }

    /// The next frame from any peer, or nil after `timeout`. Frames that are not [identity, body] are dropped.
    func receive(timeout: Duration) throws -> (peer: [UInt8], frame: [UInt8])? {
        guard let parts = try socket.receiveMultipart(timeout: timeout) else { return nil }
        let size = parts.reduce(0) { $0 + $1.count }
        bytesReceived += size
        // Copy inside withUnsafeBytes: a frame's bytes live in its message (inline for small ones),
        // which must not be freed before the copy is made.
        let id = parts[0].withUnsafeBytes { Array($0) }
        guard parts.count == 2 else { return (id, []) }
        return (id, parts[1].withUnsafeBytes { Array($0) })
    }

    func send(_ message: ControlMessage, to peer: [UInt8]) {
        let body = message.encoded()
        peer.withUnsafeBytes { id in
            body.withUnsafeBytes { b in
                // A peer that has gone away is not an error here: the caller learns of it from silence.
                _ = try? socket.sendMultipart([id, b])
            }
        }
        bytesSent += peer.count + body.count
    }

    func close() { socket.close(linger: .milliseconds(200)) }
}

/// A worker's end of the control plane: a DEALER connected to the coordinator.
final class ControlClient {
    let socket: ZMQSocket
    let coordinator: String
    private(set) var bytesSent = 0, bytesReceived = 0

    init(context: ZMQContext, coordinator: String) throws {
        self.coordinator = coordinator
        socket = try ZMQSocket(context: context, type: .dealer)
        do { try socket.connect(coordinator) } catch {
            throw ClusterError("cannot connect to the coordinator at \(coordinator): \(error)")
        }
    }

    func send(_ message: ControlMessage) throws {
        let body = message.encoded()
        try body.withUnsafeBytes { _ = try socket.send($0) }
        bytesSent += body.count
    }

    /// The next message from the coordinator, or nil after `timeout` (zero: don't wait).
    func receive(timeout: Duration) throws -> ControlMessage? {
        guard let message = try socket.receive(timeout: timeout) else { return nil }
        bytesReceived += message.count
        return try message.withUnsafeBytes { try ControlMessage.decode($0, from: "the coordinator at \(coordinator)") }
    }

    func close() { socket.close(linger: .milliseconds(500)) }
}

public struct ClusterError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
