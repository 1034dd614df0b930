// Point-to-point messaging between the ranks of a group, independent of the medium.

/// Errors of the communication layer above raw ZeroMQ (which throws `ZMQError`).
public enum CommError: Error, CustomStringConvertible, Sendable, Equatable {
    /// No message arrived from `peer` within `waited`.
    case timeout(peer: Int, waited: Duration)
    /// A message from `peer` failed validation (header, framing or length).
    case malformedMessage(peer: Int, reason: String)
    /// A rank outside 0..<worldSize, or the caller's own rank where a peer is required.
    case invalidPeer(Int, worldSize: Int)
    /// `send` to a peer this transport has no outbound connection to.
    case notConnected(peer: Int)
    /// libzmq still held lent send buffers after the timeout (a peer stopped reading).
    case sendsIncomplete(waited: Duration)
    case invalidArgument(String)
    /// The transport was closed.
    case transportClosed
    /// A receive was given up because its `Interruption` was set (the reason).
    case interrupted(String)

    public var peer: Int? {
        switch self {
        case .timeout(let p, _), .malformedMessage(let p, _), .notConnected(let p): p
        case .invalidPeer(let p, _): p
        case .sendsIncomplete, .invalidArgument, .transportClosed, .interrupted: nil
        }
    }

    public var description: String {
        switch self {
        case .timeout(let peer, let waited):
            "timed out after \(waited) waiting for a message from rank \(peer)"
        case .malformedMessage(let peer, let reason):
            "malformed message from rank \(peer): \(reason)"
        case .invalidPeer(let peer, let worldSize):
            "invalid peer rank \(peer) (group has ranks 0..<\(worldSize))"
        case .notConnected(let peer):
            "no connection to rank \(peer)"
        case .sendsIncomplete(let waited):
            "send buffers still in flight after \(waited)"
        case .invalidArgument(let what):
            "invalid argument: \(what)"
        case .transportClosed:
            "the transport is closed"
        case .interrupted(let reason):
            "the receive was interrupted: \(reason)"
        }
    }
}

/// Bytes moved by a transport, split by what they carry.
public struct ByteCounters: Equatable, Sendable, CustomStringConvertible {
    /// User payload (e.g. the Float data being reduced), exactly.
    public var payloadBytesSent = 0
    public var payloadBytesReceived = 0
    /// Protocol headers (`WireHeader`s) and any other control frames.
    public var controlBytesSent = 0
    public var controlBytesReceived = 0
    /// Transport framing: for ZeroMQ the ZMTP frame headers (2 bytes per frame up to
    /// 255 bytes, else 9); 0 in process. TCP/IP headers and handshakes are not counted.
    public var framingBytesSent = 0
    public var framingBytesReceived = 0
    public var messagesSent = 0
    public var messagesReceived = 0

    public init() {}

    public var totalBytesSent: Int { payloadBytesSent + controlBytesSent + framingBytesSent }
    public var totalBytesReceived: Int { payloadBytesReceived + controlBytesReceived + framingBytesReceived }

    public var description: String {
        "sent \(payloadBytesSent) payload + \(controlBytesSent) control + \(framingBytesSent) framing bytes in \(messagesSent) messages; "
            + "received \(payloadBytesReceived) + \(controlBytesReceived) + \(framingBytesReceived) in \(messagesReceived)"
    }
}

/// Point-to-point, ordered, reliable messages between ranks 0..<worldSize of one group.
///
/// A message is a small `control` part (protocol header) plus a `payload` part; the
/// counters keep the two apart. Messages from one sender to one receiver arrive in order.
/// A transport is used by one thread at a time.
///
/// Memory contract for `send`: an implementation may transmit `payload` without copying
/// it. The payload memory must therefore stay valid until `completeSends` returns (or
/// `abandonSends` is called), and must not be modified before the receiver has got the
/// message (for a collective, a later message from a peer that depends on it proves that).
public protocol Transport: AnyObject {
    /// This endpoint's rank.
    var rank: Int { get }
    /// Number of ranks in the group.
    var worldSize: Int { get }
    /// Bytes moved since creation or the last `resetCounters()`.
    var counters: ByteCounters { get }
    func resetCounters()

    /// Queues one message for `peer`. Does not wait for the peer to receive it.
    func send(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, to peer: Int) throws

    /// Waits up to `timeout` for the next message from `peer` and calls `body` with its
    /// parts. The bytes are only valid inside `body` (they may point straight into the
    /// transport's receive buffer, so `body` can reduce from them without a copy).
    /// Throws `CommError.timeout(peer:...)` if nothing arrives in time.
    func receive<R>(from peer: Int, timeout: Duration,
                    _ body: (_ control: UnsafeRawBufferPointer, _ payload: UnsafeRawBufferPointer) throws -> R) throws -> R

    /// Waits until the transport no longer references any payload passed to `send`.
    func completeSends(timeout: Duration) throws

    /// Drops every message still queued for sending and releases all payload references.
    /// Called on the error path of a collective so the caller may free its buffers.
    func abandonSends()
}

extension Transport {
    /// Sends `bytes` as payload with no control part.
    public func send(_ bytes: UnsafeRawBufferPointer, to peer: Int) throws {
        try send(control: UnsafeRawBufferPointer(start: nil, count: 0), payload: bytes, to: peer)
    }

    /// Receives the next message from `peer` and copies its payload into `destination`
    /// (no allocation). Returns the payload size in bytes; throws if it does not fit.
    public func receive(from peer: Int, into destination: UnsafeMutableRawBufferPointer, timeout: Duration) throws -> Int {
        try receive(from: peer, timeout: timeout) { _, payload in
            guard payload.count <= destination.count else {
                throw CommError.malformedMessage(
                    peer: peer, reason: "payload of \(payload.count) bytes does not fit in \(destination.count)")
            }
            if payload.count > 0 { destination.baseAddress!.copyMemory(from: payload.baseAddress!, byteCount: payload.count) }
            return payload.count
        }
    }

    /// Receives the next message from `peer` and returns a copy of its payload.
    public func receive(from peer: Int, timeout: Duration) throws -> [UInt8] {
        try receive(from: peer, timeout: timeout) { _, payload in Array(payload) }
    }

    func checkPeer(_ peer: Int) throws {
        guard peer >= 0, peer < worldSize, peer != rank else { throw CommError.invalidPeer(peer, worldSize: worldSize) }
    }
}
