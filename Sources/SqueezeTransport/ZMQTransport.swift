// The real transport: ZeroMQ ROUTER (inbound) + one DEALER per outbound peer.
//
// Each rank binds ONE endpoint, a ROUTER socket. To send to a peer it connects a DEALER
// to that peer's endpoint, with ROUTING_ID = "R" + its rank (UInt32 LE), so the
// receiving ROUTER knows who sent each message. A ring rank connects only to its right
// neighbour (and is connected to by its left one); in a star every worker connects to the
// hub and the hub to every worker; in a tree a rank connects to its parent and its children.
//
// On the wire (ZMTP, per message): [control frame][payload frame]; the ROUTER prepends the
// sender's routing id locally. Large payloads are sent zero-copy (`zmq_msg_init_data`) and
// received as `zmq_msg_t`, whose data is handed to the caller without a copy.
//
// Sealed (`Options.seal`, a tcp data plane of a run with a key): the sockets are plain, every frame
// is encrypted and authenticated with AES-256-GCM (Seal.swift) into a buffer of libzmq's and
// decrypted in place on arrival; the DEALERs announce no routing id (a stranger could otherwise
// claim a rank's id first) and the sender is the rank the frame's verified nonce names.
//
// For ranks on the same host prefer ipc:// endpoints: in 2-process runs on the 2-core
// development machine a 727,626-Float ring all-reduce took about half as long over ipc://
// as over tcp://127.0.0.1 (both copy twice; TCP's per-segment work is what ipc saves).

import Foundation

public final class ZMQTransport: Transport, @unchecked Sendable {
    // @unchecked Sendable: a transport (and its sockets) is used by one thread at a time;
    // moving it to another thread through a thread start/join or a lock is the full
    // memory barrier libzmq requires for migrating sockets. The release tracker is the
    // only state shared with libzmq's threads, and it is internally locked.

    public struct Options: Sendable {
        /// Payloads at least this large are lent to libzmq instead of copied.
        public var zeroCopyThreshold = 8 << 10
        /// TCP keepalive on every socket (detects vanished peers on idle connections).
        public var tcpKeepAlive = true
        /// Inbound frames larger than this disconnect the sender; -1 = no limit.
        public var maxMessageBytes = -1
        /// Complete inbound messages queued per peer before libzmq stops reading from it (back
        /// pressure, never loss: senders queue on their side).
        public var receiveQueueMessages = 1_000
        /// CURVE on the ROUTER (server) and every DEALER (client), or plain.
        public var security = PeerSecurity.insecure
        /// Seal every frame with AES-256-GCM under keys of this run key and salt (Seal.swift), on
        /// sockets that are then plain (`security` .insecure): the DEALERs announce no routing id,
        /// and a frame's sender is the rank its verified nonce names. The seal's nonce and tag
        /// travel in the control part and are counted as control bytes.
        public var seal: DataPlaneSeal? = nil
        /// Kernel socket buffer size (ZMQ_SNDBUF / ZMQ_RCVBUF) in bytes; nil keeps the OS default.
        public var kernelBufferBytes: Int? = nil
        /// I/O threads, when the transport creates its own context.
        public var ioThreads = 1
        /// Upper bound on waiting for libzmq to release lent buffers after `abandonSends`.
        public var abandonTimeout: Duration = .seconds(30)

        public init() {}
    }

    public let rank: Int
    public let worldSize: Int
    private let context: ZMQContext
    private let ownsContext: Bool
    public private(set) var isClosed = false
    /// The endpoint actually bound (wildcards resolved via ZMQ_LAST_ENDPOINT); give this
    /// to the peers that must connect here.
    public let boundEndpoint: String
    public private(set) var counters = ByteCounters()
    public let options: Options

    private let inbound: ZMQSocket
    private var outbound: [ZMQSocket?]
    private var outboundEndpoints: [String?]
    private let tracker = ZMQReleaseTracker()
    /// The sealing state when `options.seal` is set.
    private let sealer: FrameSealer?
    /// A sealed frame's control part: the message's, then the seal's nonce and tag.
    private var sealedControl = [UInt8]()
    /// The buffers sealed payloads are encrypted into, reused once libzmq has sent them.
    private let sealBuffers = ZMQBufferPool()
    /// Complete messages that arrived from a peer other than the one being waited for.
    private var stash: [[(control: ZMQMessage, payload: ZMQMessage)]]
    /// The ranks this one receives from, once `connect(topology:)` said; frames from others are dropped.
    private var inboundPeers: Set<Int>?
    /// Messages dropped: from an unknown routing id or an unexpected rank, malformed, or over the stash bound.
    public private(set) var droppedMessages = 0
    /// Ends a blocked receive promptly once set (nil: a receive waits out its timeout).
    public var interruption: Interruption?
    /// A message that keeps arriving from a peer nobody waits for cannot grow memory without bound.
    static let stashLimit = 4_096
    // Reusable receive/send frames: no allocation per message on the hot path.
    private let idFrame = ZMQMessage()
    private let controlFrame = ZMQMessage()
    private let payloadFrame = ZMQMessage()
    private let spareFrame = ZMQMessage()
    private let sendFrame = ZMQMessage()

    /// Creates rank `rank` of a group of `worldSize` and binds `endpoint`
    /// (e.g. "tcp://127.0.0.1:*" to pick a free port, or "ipc:///tmp/name").
    /// Pass a `context` to share I/O threads between transports; otherwise one is made.
    public init(rank: Int, worldSize: Int, bind endpoint: String, context: ZMQContext? = nil,
                options: Options = Options()) throws {
        guard worldSize >= 1, (0..<worldSize).contains(rank), worldSize <= Int(UInt16.max) else {
            throw CommError.invalidArgument("rank \(rank) of world size \(worldSize)")
        }
        self.rank = rank
        self.worldSize = worldSize
        self.options = options
        self.context = try context ?? ZMQContext(ioThreads: options.ioThreads)
        self.ownsContext = context == nil
        self.outbound = Array(repeating: nil, count: worldSize)
        self.outboundEndpoints = Array(repeating: nil, count: worldSize)
        self.stash = Array(repeating: [], count: worldSize)
        self.sealer = options.seal.map { FrameSealer(seal: $0, rank: rank) }
        let router = try ZMQSocket(context: self.context, type: .router)
        try router.setReceiveHighWaterMark(options.receiveQueueMessages)
        try router.setRouterHandover(false)  // a second connection announcing a live rank's id is refused, not handed the rank
        try router.secureAsServer(options.security)
        if options.tcpKeepAlive { try router.setTCPKeepAlive(true) }
        if options.maxMessageBytes >= 0 { try router.setMaxMessageSize(options.maxMessageBytes) }
        if let bytes = options.kernelBufferBytes { try router.setKernelBuffers(bytes) }
        try router.bind(endpoint)
        self.inbound = router
        self.boundEndpoint = try router.lastEndpoint
    }

    deinit {
        if !isClosed {
            for s in outbound { s?.close() }
            _ = tracker.waitUntilAllReleased(timeout: options.abandonTimeout)
            inbound.close()
        }
    }

    /// Shuts the transport down gracefully: messages still queued inside libzmq (which can
    /// include the tail of the last collective even after `completeSends`, since libzmq
    /// releases a buffer once it has copied it into its own batch) get up to `flushTimeout`
    /// to reach the peers. Call it before the process exits. Idempotent; afterwards every
    /// operation throws `CommError.transportClosed`.
    ///
    /// If the transport created its own context, this also terminates it, which blocks until
    /// the flush completes or `flushTimeout` expires. With a shared context the flush
    /// continues in the background and the context's `terminate()` waits for it.
    public func close(flushTimeout: Duration = .seconds(2)) {
        guard !isClosed else { return }
        isClosed = true
        for s in outbound { s?.close(linger: flushTimeout) }
        inbound.close()
        // libzmq unlinks an ipc socket file only if its I/O thread gets to it before the process ends.
        if boundEndpoint.hasPrefix("ipc://") { unlink(String(boundEndpoint.dropFirst(6))) }
        if ownsContext { context.terminate() }
        guard tracker.waitUntilAllReleased(timeout: flushTimeout + options.abandonTimeout) else {
            fatalError("ZMQTransport: libzmq did not release lent send buffers after closing")
        }
    }

    /// The routing id a rank's DEALERs announce: "R" followed by the rank as UInt32 LE.
    public static func routingID(rank: Int) -> [UInt8] {
        let r = UInt32(rank)
        return [0x52, UInt8(r & 0xff), UInt8((r >> 8) & 0xff), UInt8((r >> 16) & 0xff), UInt8(r >> 24)]
    }

    static func rank(fromRoutingID id: UnsafeRawBufferPointer) -> Int? {
        guard id.count == 5, id[0] == 0x52 else { return nil }
        return Int(id[1]) | Int(id[2]) << 8 | Int(id[3]) << 16 | Int(id[4]) << 24
    }

    /// Opens the outbound connection to `peer`, whose transport is bound at `endpoint`.
    /// Messages sent before the connection completes are queued.
    public func connect(to peer: Int, endpoint: String) throws {
        guard !isClosed else { throw CommError.transportClosed }
        try checkPeer(peer)
        outbound[peer]?.close()
        outbound[peer] = try makeDealer(endpoint: endpoint)
        outboundEndpoints[peer] = endpoint
    }

    /// Connects to every peer `topology` says this rank sends to; `endpoints[r]` is rank r's
    /// bound endpoint.
    public func connect(topology: Topology, endpoints: [String]) throws {
        guard endpoints.count == worldSize else {
            throw CommError.invalidArgument("\(endpoints.count) endpoints for a group of \(worldSize)")
        }
        inboundPeers = Set(topology.inboundPeers(rank: rank, worldSize: worldSize))
        for peer in topology.outboundPeers(rank: rank, worldSize: worldSize) {
            try connect(to: peer, endpoint: endpoints[peer])
        }
    }

    /// Creates a whole group in this process (ranks as threads): binds each rank to
    /// `endpoint(rank)` and connects them according to `topology`.
    public static func localGroup(worldSize: Int, topology: Topology,
                                  endpoint: (Int) -> String = { _ in "tcp://127.0.0.1:*" },
                                  options: Options = Options()) throws -> [ZMQTransport] {
        let group = try (0..<worldSize).map {
            try ZMQTransport(rank: $0, worldSize: worldSize, bind: endpoint($0), options: options)
        }
        let endpoints = group.map(\.boundEndpoint)
        for t in group { try t.connect(topology: topology, endpoints: endpoints) }
        return group
    }

    private func makeDealer(endpoint: String) throws -> ZMQSocket {
        let dealer = try ZMQSocket(context: context, type: .dealer)
        try dealer.setSendHighWaterMark(0)  // collectives bound the queue; never block in send
        if sealer == nil { try dealer.setRoutingID(Self.routingID(rank: rank)) }  // sealed: the nonce names the sender
        try dealer.secureAsClient(options.security)
        if options.tcpKeepAlive { try dealer.setTCPKeepAlive(true) }
        if let bytes = options.kernelBufferBytes { try dealer.setKernelBuffers(bytes) }
        try dealer.connect(endpoint)
        return dealer
    }

    public func resetCounters() { counters = ByteCounters() }

    /// Payload buffers currently lent to libzmq (zero-copy sends not yet released).
    public var lentSendBuffers: Int { tracker.outstandingLoans }

    /// ZMTP v3 frame header size: flags + 1-byte length up to 255 bytes, else flags + 8 bytes.
    @inline(__always)
    static func framingBytes(_ frameSize: Int) -> Int { frameSize <= 255 ? 2 : 9 }

    // MARK: Send

    public func send(control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer, to peer: Int) throws {
        guard !isClosed else { throw CommError.transportClosed }
        try checkPeer(peer)
        guard let socket = outbound[peer] else { throw CommError.notConnected(peer: peer) }
        if let sealer { return try sendSealed(sealer, control: control, payload: payload, to: peer, socket: socket) }
        try socket.send(control, more: true)
        if payload.count >= options.zeroCopyThreshold {
            try sendFrame.setBorrowed(payload, tracker: tracker)
            do {
                try socket.send(sendFrame)
            } catch {
                sendFrame.reset()  // releases the loan if libzmq did not take it
                throw error
            }
        } else {
            try socket.send(payload)
        }
        counters.controlBytesSent += control.count
        counters.payloadBytesSent += payload.count
        counters.framingBytesSent += Self.framingBytes(control.count) + Self.framingBytes(payload.count)
        counters.messagesSent += 1
    }

    /// Encrypts `payload` into a pooled buffer (libzmq gives it back to the pool once sent: nothing of
    /// the caller's is lent) and sends [control + nonce + tag, ciphertext]. Sealing one chunk while
    /// libzmq's I/O thread writes the previous one overlaps the cipher with the wire.
    private func sendSealed(_ sealer: FrameSealer, control: UnsafeRawBufferPointer, payload: UnsafeRawBufferPointer,
                            to peer: Int, socket: ZMQSocket) throws {
        sealedControl.removeAll(keepingCapacity: true)
        sealedControl.append(contentsOf: control)
        sealedControl.append(contentsOf: repeatElement(0, count: DataPlaneSeal.overheadBytes))
        try sendFrame.allocate(count: payload.count, from: sealBuffers)
        try sealedControl.withUnsafeMutableBytes { c in
            try sealer.seal(to: peer, aad: control, plaintext: payload, into: sendFrame.mutableBytes,
                            trailer: UnsafeMutableRawBufferPointer(rebasing: c[control.count...]))
        }
        try sealedControl.withUnsafeBytes { _ = try socket.send($0, more: true) }
        do {
            try socket.send(sendFrame)
        } catch {
            sendFrame.reset()
            throw error
        }
        counters.controlBytesSent += sealedControl.count
        counters.payloadBytesSent += payload.count
        counters.framingBytesSent += Self.framingBytes(sealedControl.count) + Self.framingBytes(payload.count)
        counters.messagesSent += 1
    }

    public func completeSends(timeout: Duration) throws {
        let deadline = ContinuousClock.now + timeout
        // With an interruption, in short waits: a send to a peer that died is never released.
        while !tracker.waitUntilAllReleased(timeout: interruption == nil ? timeout : min(timeout, Interruption.pollInterval)) {
            if let reason = interruption?.reason {
                abandonSends()
                throw CommError.interrupted(reason)
            }
            if ContinuousClock.now >= deadline {
                abandonSends()
                throw CommError.sendsIncomplete(waited: timeout)
            }
        }
    }

    /// Closes every outbound socket (linger 0 drops what is queued, which releases the lent
    /// buffers), waits for libzmq to confirm the release, and reconnects.
    public func abandonSends() {
        guard !isClosed else { return }
        for peer in 0..<worldSize {
            guard let socket = outbound[peer] else { continue }
            socket.close()
            outbound[peer] = nil
        }
        guard tracker.waitUntilAllReleased(timeout: options.abandonTimeout) else {
            // Returning would let the caller free memory libzmq may still read.
            fatalError("ZMQTransport: libzmq did not release lent send buffers within \(options.abandonTimeout)")
        }
        for peer in 0..<worldSize {
            guard let endpoint = outboundEndpoints[peer] else { continue }
            outbound[peer] = try? makeDealer(endpoint: endpoint)
        }
    }

    // MARK: Receive

    public func receive<R>(from peer: Int, timeout: Duration,
                           _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard !isClosed else { throw CommError.transportClosed }
        try checkPeer(peer)
        if !stash[peer].isEmpty {
            let m = stash[peer].removeFirst()
            return try deliver(control: m.control, payload: m.payload, body)
        }
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while true {
            if let sender = try readMessage() {
                if sender == peer {
                    defer { controlFrame.reset(); payloadFrame.reset() }
                    return try deliver(control: controlFrame, payload: payloadFrame, body)
                }
                guard stash[sender].count < Self.stashLimit else {
                    droppedMessages += 1
                    continue
                }
                let c = ZMQMessage(), p = ZMQMessage()
                c.take(from: controlFrame)
                p.take(from: payloadFrame)
                stash[sender].append((c, p))
                continue
            }
            let remaining = deadline - ContinuousClock.now
            if remaining <= .zero { throw CommError.timeout(peer: peer, waited: timeout) }
            if let reason = interruption?.reason { throw CommError.interrupted(reason) }
            _ = try inbound.waitReadable(timeout: interruption == nil ? remaining : min(remaining, Interruption.pollInterval))
        }
    }

    private func deliver<R>(control: ZMQMessage, payload: ZMQMessage,
                            _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> R) throws -> R {
        // A sealed frame's nonce and tag were checked by `readRest`; the collective sees the message's control part.
        let c = sealer == nil ? control.bytes : UnsafeRawBufferPointer(rebasing: control.bytes.dropLast(DataPlaneSeal.overheadBytes))
        let p = payload.bytes
        counters.controlBytesReceived += control.count
        counters.payloadBytesReceived += p.count
        counters.framingBytesReceived += Self.framingBytes(control.count) + Self.framingBytes(p.count)
        counters.messagesReceived += 1
        return try body(c, p)
    }

    /// Reads one complete message into idFrame/controlFrame/payloadFrame if one is waiting and
    /// returns the sender's rank; nil if nothing is available. A message that is not [control,
    /// payload] from an expected rank is dropped and counted: the run goes on (a stranger cannot stop it).
    private func readMessage() throws -> Int? {
        while true {
            guard try inbound.receive(into: idFrame, dontWait: true) else { return nil }
            if let sender = try readRest() { return sender }
            droppedMessages += 1
        }
    }

    private func readRest() throws -> Int? {
        // The remaining frames of a multipart message are delivered atomically with the first.
        var frames = 0
        var more = idFrame.hasMore
        for frame in [controlFrame, payloadFrame] {
            if more {
                try inbound.receive(into: frame)
                frames += 1
                more = frame.hasMore
            } else {
                frame.reset()
            }
        }
        while more {
            try inbound.receive(into: spareFrame)
            frames += 1
            more = spareFrame.hasMore
        }
        spareFrame.reset()
        guard frames == 2 else { return nil }
        if let sealer { return openSealed(sealer) }
        guard let sender = Self.rank(fromRoutingID: idFrame.bytes), sender < worldSize, sender != rank,
              inboundPeers?.contains(sender) ?? true else { return nil }
        return sender
    }

    /// Decrypts the payload frame in place; the sender's rank, or nil if the frame is not a sealed
    /// frame to this rank from a rank it receives from, newer than the last one from there, and intact.
    private func openSealed(_ sealer: FrameSealer) -> Int? {
        let c = controlFrame.bytes
        guard c.count >= DataPlaneSeal.overheadBytes else { return nil }
        let split = c.count - DataPlaneSeal.overheadBytes
        return sealer.open(aad: UnsafeRawBufferPointer(rebasing: c[..<split]), trailer: UnsafeRawBufferPointer(rebasing: c[split...]),
                           bytes: payloadFrame.mutableBytes) { [worldSize, inboundPeers] in $0 < worldSize && inboundPeers?.contains($0) ?? true }
    }
}
