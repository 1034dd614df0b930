// A group of transports inside one process: the in-memory stand-in for tests.

import SqueezeSystem

/// N connected in-process endpoints. Messages are copied into per-(sender, receiver)
/// FIFO queues, so delivery order is deterministic and `send` never blocks.
public final class InProcessGroup: Sendable {
    public let worldSize: Int
    public let endpoints: [InProcessTransport]

    public init(worldSize: Int) {
        precondition(worldSize >= 1, "a group needs at least one rank")
        self.worldSize = worldSize
        let mailboxes = (0..<worldSize).map { _ in Mailbox(worldSize: worldSize) }
        self.endpoints = (0..<worldSize).map { InProcessTransport(mailboxes: mailboxes, rank: $0) }
    }

    public subscript(rank: Int) -> InProcessTransport { endpoints[rank] }
}

/// One rank's inbox: a FIFO per sender.
fileprivate final class Mailbox: @unchecked Sendable {
    // @unchecked Sendable: `queues` is only touched with `monitor` held.
    struct Message {
        var control: [UInt8]
        var payload: [UInt8]
    }

    let monitor = Monitor()
    var queues: [[Message]]
    var heads: [Int]

    init(worldSize: Int) {
        queues = Array(repeating: [], count: worldSize)
        heads = Array(repeating: 0, count: worldSize)
    }

    func post(_ m: Message, from sender: Int) {
        monitor.withLock {
            queues[sender].append(m)
            monitor.broadcast()
        }
    }

    func take(from sender: Int, deadline: ContinuousClock.Instant) -> Message? {
        monitor.withLock {
            while heads[sender] == queues[sender].count {
                if !monitor.wait(until: deadline) && heads[sender] == queues[sender].count { return nil }
            }
            let m = queues[sender][heads[sender]]
            heads[sender] += 1
            if heads[sender] == queues[sender].count {  // drained: reuse the array's storage
                queues[sender].removeAll(keepingCapacity: true)
                heads[sender] = 0
            }
            return m
        }
    }
}

/// One rank of an `InProcessGroup`.
public final class InProcessTransport: Transport, @unchecked Sendable {
    // @unchecked Sendable: shared state is in the group's locked mailboxes; `counters` is
    // only mutated by the thread using this endpoint (a transport is single-threaded).
    private let mailboxes: [Mailbox]
    public let rank: Int
    public var worldSize: Int { mailboxes.count }
    public private(set) var counters = ByteCounters()
    /// Ends a blocked receive promptly once set (nil: a receive waits out its timeout).
    public var interruption: Interruption?

    fileprivate init(mailboxes: [Mailbox], rank: Int) {
        self.mailboxes = mailboxes
        self.rank = rank
    }

    public func resetCounters() { counters = ByteCounters() }

    public func send(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, to peer: Int) throws {
        try checkPeer(peer)
        let m = Mailbox.Message(control: Array(control), payload: Array(payload))
        mailboxes[peer].post(m, from: rank)
        counters.controlBytesSent += control.count
        counters.payloadBytesSent += payload.count
        counters.messagesSent += 1
    }

    public func receive<R>(from peer: Int, timeout: Duration,
                           _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> R) throws -> R {
        try checkPeer(peer)
        let deadline = ContinuousClock.now.advanced(by: timeout)
        var message: Mailbox.Message?
        while message == nil {
            if let reason = interruption?.reason { throw CommError.interrupted(reason) }
            guard ContinuousClock.now < deadline else { throw CommError.timeout(peer: peer, waited: timeout) }
            let slice = interruption == nil ? deadline : min(deadline, .now.advanced(by: Interruption.pollInterval))
            message = mailboxes[rank].take(from: peer, deadline: slice)
        }
        let m = message!
        counters.controlBytesReceived += m.control.count
        counters.payloadBytesReceived += m.payload.count
        counters.messagesReceived += 1
        return try m.control.withUnsafeBytes { c in
            try m.payload.withUnsafeBytes { p in try body(c, p) }
        }
    }

    /// Sends copy their payload, so nothing is ever outstanding.
    public func completeSends(timeout: Duration) throws {}
    public func abandonSends() {}
}
