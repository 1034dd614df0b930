// The control plane inside one process: the in-memory twin of the coordinator's ROUTER socket and
// the workers' DEALERs, for tests that drive the cluster protocol deterministically.

import SqueezeSystem

/// One coordinator end (`server`) and any number of worker ends (`connect()`). Frames are copied
/// into FIFO queues, so order is deterministic and `send` never blocks. Peer identities are
/// "peer-0", "peer-1", … in connection order.
public final class InProcessControlPlane: ControlConnector, @unchecked Sendable {
    // @unchecked Sendable: every queue is touched with `monitor` held.
    fileprivate let monitor = Monitor()
    fileprivate var toServer = [(peer: [UInt8], frame: [UInt8])]()
    fileprivate var toClients = [[UInt8]: [[UInt8]]]()
    fileprivate var closed = Set<[UInt8]>()
    fileprivate var connections = 0
    public let coordinator: String
    public private(set) lazy var server = InProcessControlServer(plane: self)

    public init(endpoint: String = "inproc://coordinator") { coordinator = endpoint }

    public func connect(identity: [UInt8]) throws -> any ControlClientChannel { connectClient(identity: identity) }

    /// A worker end with its concrete type (tests read its identity): `identity`, or "peer-0",
    /// "peer-1", … in connection order.
    public func connectClient(identity: [UInt8]? = nil) -> InProcessControlClient {
        let id = monitor.withLock { () -> [UInt8] in
            defer { connections += 1 }
            let id = identity ?? Array("peer-\(connections)".utf8)
            toClients[id] = []
            closed.remove(id)
            return id
        }
        return InProcessControlClient(plane: self, identity: id)
    }

    /// Frames queued for the coordinator (not yet received).
    public var pendingForServer: Int { monitor.withLock { toServer.count } }

    fileprivate func wait<T>(timeout: Duration, _ take: () -> T?) -> T? {
        let deadline = ContinuousClock.now + timeout
        return monitor.withLock {
            while true {
                if let value = take() { return value }
                if timeout <= .zero || !monitor.wait(until: deadline) {
                    return take()
                }
            }
        }
    }
}

public final class InProcessControlServer: ControlServerChannel, @unchecked Sendable {
    // @unchecked Sendable: shared state lives in the plane, under its lock; counters belong to the coordinator's thread.
    private unowned let plane: InProcessControlPlane
    public private(set) var bytesSent = 0, bytesReceived = 0
    public var endpoint: String { plane.coordinator }

    fileprivate init(plane: InProcessControlPlane) { self.plane = plane }

    public func receive(timeout: Duration) throws -> (peer: [UInt8], frame: [UInt8])? {
        let got = plane.wait(timeout: timeout) { plane.toServer.isEmpty ? nil : plane.toServer.removeFirst() }
        if let got { bytesReceived += got.peer.count + got.frame.count }
        return got
    }

    public func send(_ frame: [UInt8], to peer: [UInt8]) {
        plane.monitor.withLock {
            guard !plane.closed.contains(peer), plane.toClients[peer] != nil else { return }
            plane.toClients[peer]!.append(frame)
            plane.monitor.broadcast()
        }
        bytesSent += peer.count + frame.count
    }

    public func close() {}
}

public final class InProcessControlClient: ControlClientChannel, @unchecked Sendable {
    // @unchecked Sendable: as the server.
    private let plane: InProcessControlPlane
    public let identity: [UInt8]
    public private(set) var bytesSent = 0, bytesReceived = 0
    public var handshakeFailure: String? { nil }

    fileprivate init(plane: InProcessControlPlane, identity: [UInt8]) {
        self.plane = plane; self.identity = identity
    }

    public func send(_ frame: [UInt8]) throws {
        trySend(frame)
    }

    public func trySend(_ frame: [UInt8]) {
        let sent = plane.monitor.withLock { () -> Bool in
            guard !plane.closed.contains(identity) else { return false }
            plane.toServer.append((identity, frame))
            plane.monitor.broadcast()
            return true
        }
        if sent { bytesSent += frame.count }
    }

    public func receive(timeout: Duration) throws -> [UInt8]? {
        let got = plane.wait(timeout: timeout) { () -> [UInt8]? in
            guard let queue = plane.toClients[identity], !queue.isEmpty else { return nil }
            return plane.toClients[identity]!.removeFirst()
        }
        if let got { bytesReceived += got.count }
        return got
    }

    /// Later frames either way are dropped, as with a closed socket.
    public func close() {
        plane.monitor.withLock {
            plane.closed.insert(identity)
            plane.monitor.broadcast()
        }
    }
}
