// A thin Swift layer over libzmq 4.3: contexts, sockets, messages, one error type.
//
// Rules this file follows (the pitfalls of ZeroMQ bindings):
// - every receive goes through `zmq_msg_t` (ZMQMessage); `zmq_recv` into a fixed
//   buffer silently truncates and is never used;
// - every socket gets ZMQ_LINGER = 0, so closing it drops unsent messages and
//   `zmq_ctx_term` can never block forever;
// - a C failure (-1 + errno) becomes `ZMQError`, i.e. `SystemError` (errno, function, zmq_strerror);
//   EINTR is retried; EAGAIN is not an error (the call returns nil / false).

import CZeroMQ
import SqueezeSystem

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Error

/// The ZeroMQ wrapper's errors are the project's one system-error type, with libzmq's own
/// message for the code (`zmq_strerror`, which also knows ZeroMQ's codes such as ETERM).
public typealias ZMQError = SystemError

extension SystemError {
    /// A libzmq call failed with `code` (from `zmq_errno()`).
    init(zmq code: Int32, function: String) {
        self.init(code: code, function: function, message: String(cString: zmq_strerror(code)))
    }
}

/// Runs a libzmq call that returns -1 on failure. Retries EINTR; returns nil on EAGAIN;
/// throws `ZMQError` for anything else.
@inline(__always)
func zmqCall(_ function: StaticString, _ body: () -> Int32) throws(ZMQError) -> Int32? {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let e = zmq_errno()
        if e == EINTR { continue }
        if e == EAGAIN { return nil }
        throw ZMQError(zmq: e, function: "\(function)")
    }
}

/// Milliseconds for `zmq_poll`: nil means "wait forever" (-1); negative durations become 0.
func pollMilliseconds(_ timeout: Duration?) -> Int {
    guard let timeout else { return -1 }
    let (seconds, attoseconds) = timeout.components
    if seconds < 0 || (seconds == 0 && attoseconds <= 0) { return 0 }
    let ms = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000  // round up
    return Int(min(ms, Int64(Int32.max)))
}

// MARK: - Context

/// A ZeroMQ context (`zmq_ctx_new`), which owns the I/O threads.
///
/// Sockets keep their context alive, so the context is terminated only after every
/// socket created from it is closed; because sockets close with linger 0, the
/// termination in `deinit` never blocks on undelivered messages.
public final class ZMQContext: @unchecked Sendable {
    // @unchecked Sendable: the context handle is documented by libzmq as thread-safe;
    // the only mutable Swift state, `terminated`, is guarded by `lock`.
    let handle: UnsafeMutableRawPointer
    private let lock = Monitor()
    private var terminated = false
    private var zap: ZAPAuthenticator?

    /// - Parameter ioThreads: libzmq I/O threads (ZMQ_IO_THREADS); 1 is enough for ~1 GB/s per thread.
    public init(ioThreads: Int = 1) throws(ZMQError) {
        guard let h = zmq_ctx_new() else { throw ZMQError(zmq: zmq_errno(), function: "zmq_ctx_new") }
        handle = h
        if ioThreads != 1 {
            _ = try zmqCall("zmq_ctx_set") { zmq_ctx_set(h, ZMQ_IO_THREADS, Int32(ioThreads)) }
        }
    }

    /// Starts the context's ZAP handler for `security` (once; nothing without a key). Every CURVE
    /// server socket of the context needs it. `onFailure` is called if it ever stops before the
    /// context ends (the sockets then refuse every client).
    public func authenticate(_ security: PeerSecurity, log: @escaping @Sendable (String) -> Void,
                             onFailure: @escaping @Sendable (String) -> Void = { _ in }) throws {
        guard case .curve(let key) = security, authenticator == nil else { return }
        let made = try ZAPAuthenticator(context: self, key: key, log: log, onFailure: onFailure)
        lock.withLock { zap = made }
    }

    /// The running ZAP handler, if `authenticate` started one.
    public var authenticator: ZAPAuthenticator? { lock.withLock { zap } }

    /// Terminates the context (`zmq_ctx_term`, idempotent). Blocks until every socket of
    /// the context is closed and their pending messages are sent or their linger expired.
    public func terminate() {
        let first = lock.withLock {
            defer { terminated = true }
            return !terminated
        }
        guard first else { return }
        while zmq_ctx_term(handle) == -1 && zmq_errno() == EINTR {}
    }

    deinit { terminate() }
}

// MARK: - Message

/// One message frame, owning a heap-allocated `zmq_msg_t` (libzmq requires a stable address).
///
/// A `ZMQMessage` can be reused for many receives: each `receive(into:)` releases the
/// previous content, so a receive loop allocates nothing per message.
public final class ZMQMessage {
    let msg: UnsafeMutablePointer<zmq_msg_t>

    /// The descriptor of the connection a received frame came in on (ZMQ_SRCFD), or -1.
    public var sourceDescriptor: Int32 { zmq_msg_get(msg, ZMQ_SRCFD) }

    /// An empty message, ready to receive into.
    public init() {
        msg = .allocate(capacity: 1)
        zmq_msg_init(msg)  // cannot fail
    }

    /// A message holding a copy of `bytes`.
    public convenience init(copying bytes: UnsafeRawBufferPointer) throws(ZMQError) {
        self.init()
        try setCopy(of: bytes)
    }

    /// A zero-copy message that points at `bytes` (`zmq_msg_init_data`). The memory must
    /// stay valid and unmodified until `tracker` reports that libzmq released it.
    public convenience init(borrowing bytes: UnsafeRawBufferPointer, tracker: ZMQReleaseTracker) throws(ZMQError) {
        self.init()
        try setBorrowed(bytes, tracker: tracker)
    }

    /// Replaces the content with a copy of `bytes` (`zmq_msg_init_size` + memcpy).
    public func setCopy(of bytes: UnsafeRawBufferPointer) throws(ZMQError) {
        zmq_msg_close(msg)
        if zmq_msg_init_size(msg, bytes.count) == -1 {
            let e = zmq_errno()
            zmq_msg_init(msg)
            throw ZMQError(zmq: e, function: "zmq_msg_init_size")
        }
        if let base = bytes.baseAddress, bytes.count > 0 {
            zmq_msg_data(msg).copyMemory(from: base, byteCount: bytes.count)
        }
    }

    /// Replaces the content with a zero-copy reference to `bytes` (`zmq_msg_init_data`).
    /// The memory must stay valid and unmodified until `tracker` reports that libzmq
    /// released it (after the message was sent and closed, or dropped).
    public func setBorrowed(_ bytes: UnsafeRawBufferPointer, tracker: ZMQReleaseTracker) throws(ZMQError) {
        zmq_msg_close(msg)
        guard let base = bytes.baseAddress, bytes.count > 0 else {
            zmq_msg_init(msg)
            return
        }
        tracker.willLend()
        let hint = Unmanaged.passRetained(tracker).toOpaque()
        if zmq_msg_init_data(msg, UnsafeMutableRawPointer(mutating: base), bytes.count, zmqReleaseCallback, hint) == -1 {
            // libzmq did not take the buffer: undo the loan ourselves.
            let e = zmq_errno()
            zmqReleaseCallback(nil, hint)
            zmq_msg_init(msg)
            throw ZMQError(zmq: e, function: "zmq_msg_init_data")
        }
    }

    deinit {
        zmq_msg_close(msg)
        msg.deallocate()
    }

    /// Replaces the content with `count` uninitialised bytes of a buffer from `pool`, to be written
    /// through `mutableBytes` before the message is sent; libzmq hands the buffer back to the pool
    /// once it has sent it (or dropped it).
    public func allocate(count: Int, from pool: ZMQBufferPool) throws(ZMQError) {
        zmq_msg_close(msg)
        let buffer = pool.take(atLeast: count)
        let loan = Unmanaged.passRetained(ZMQBufferPool.Loan(pool: pool, buffer: buffer)).toOpaque()
        if zmq_msg_init_data(msg, buffer.baseAddress, count, zmqPoolCallback, loan) == -1 {
            let e = zmq_errno()
            zmqPoolCallback(nil, loan)
            zmq_msg_init(msg)
            throw ZMQError(zmq: e, function: "zmq_msg_init_data")
        }
    }

    /// Payload size in bytes.
    public var count: Int { zmq_msg_size(msg) }

    /// The frame's bytes, writable: a message this process allocated or received owns them (a
    /// received frame is decrypted in place).
    public var mutableBytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: zmq_msg_data(msg), count: zmq_msg_size(msg))
    }

    /// True if another frame of the same multipart message follows (`zmq_msg_more`).
    public var hasMore: Bool { zmq_msg_more(msg) != 0 }

    /// The frame's bytes, valid while the message is neither received into again nor freed.
    public var bytes: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: zmq_msg_data(msg), count: zmq_msg_size(msg))
    }

    /// Calls `body` with the frame's bytes.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(bytes)
    }

    /// Releases the content and leaves an empty message (drops our reference to the data early).
    public func reset() {
        zmq_msg_close(msg)
        zmq_msg_init(msg)
    }

    /// Moves the content of `other` into this message (`zmq_msg_move`); `other` becomes empty.
    public func take(from other: ZMQMessage) {
        zmq_msg_move(msg, other.msg)  // cannot fail for valid messages
    }
}

/// Counts zero-copy buffers lent to libzmq and lets a thread wait until all are released.
///
/// libzmq calls the release callback from its I/O (or reaper) thread when it no longer
/// needs a buffer given to `zmq_msg_init_data`; until then the buffer must not be freed.
public final class ZMQReleaseTracker: @unchecked Sendable {
    // @unchecked Sendable: `outstanding` is only read or written with `lock` held; the
    // callback runs on libzmq's threads, `wait` on the owner's thread.
    private let lock = Monitor()
    private var outstanding = 0

    public init() {}

    func willLend() { lock.withLock { outstanding += 1 } }

    func released() {
        lock.withLock {
            outstanding -= 1
            if outstanding == 0 { lock.broadcast() }
        }
    }

    /// Buffers currently held by libzmq.
    public var outstandingLoans: Int { lock.withLock { outstanding } }

    /// Waits until libzmq has released every lent buffer. Returns false on timeout
    /// (nil timeout waits forever).
    public func waitUntilAllReleased(timeout: Duration?) -> Bool {
        let deadline = timeout.map { ContinuousClock.now.advanced(by: $0) }
        return lock.withLock {
            while outstanding > 0 {
                if !lock.wait(until: deadline) && outstanding > 0 { return false }
            }
            return true
        }
    }
}

/// Buffers for messages their sender fills itself (sealed frames), reused once libzmq has sent them:
/// a stream of 1 MiB frames then does not map and fault in fresh pages for every frame, as buffers of
/// libzmq's own (`zmq_msg_init_size`) do whenever glibc's allocator has handed large blocks back to
/// the kernel (docs/cluster.md, "The sealed data plane", has the page faults this saves).
/// Sizes are rounded up to a power of two (at least 4 KiB); a few buffers of each size are kept.
public final class ZMQBufferPool: @unchecked Sendable {
    // @unchecked Sendable: `spare` is only touched with `lock` held (buffers come back on libzmq's I/O thread).
    private let lock = Monitor()
    private var spare = [Int: [UnsafeMutableRawBufferPointer]]()
    /// Buffers kept per size; more that come back at once are freed.
    private let keep: Int

    public init(keep: Int = 8) { self.keep = keep }

    deinit { for buffers in spare.values { for b in buffers { b.deallocate() } } }

    /// A buffer lent to libzmq, and the pool it goes back to (the `hint` of `zmqPoolCallback`).
    final class Loan {
        let pool: ZMQBufferPool, buffer: UnsafeMutableRawBufferPointer
        init(pool: ZMQBufferPool, buffer: UnsafeMutableRawBufferPointer) { self.pool = pool; self.buffer = buffer }
    }

    func take(atLeast count: Int) -> UnsafeMutableRawBufferPointer {
        let size = max(4096, 1 << (Int.bitWidth - (count - 1).leadingZeroBitCount))
        return lock.withLock { spare[size]?.popLast() } ?? .allocate(byteCount: size, alignment: 64)
    }

    func give(_ buffer: UnsafeMutableRawBufferPointer) {
        let kept = lock.withLock { () -> Bool in
            guard spare[buffer.count, default: []].count < keep else { return false }
            spare[buffer.count, default: []].append(buffer)
            return true
        }
        if !kept { buffer.deallocate() }
    }
}

/// The `zmq_free_fn` of pooled messages: `hint` is a +1 reference to a `ZMQBufferPool.Loan`.
private func zmqPoolCallback(_ data: UnsafeMutableRawPointer?, _ hint: UnsafeMutableRawPointer?) {
    guard let hint else { return }
    let loan = Unmanaged<ZMQBufferPool.Loan>.fromOpaque(hint).takeRetainedValue()
    loan.pool.give(loan.buffer)
}

/// The `zmq_free_fn` for zero-copy messages: `hint` is a +1 reference to a ZMQReleaseTracker.
private func zmqReleaseCallback(_ data: UnsafeMutableRawPointer?, _ hint: UnsafeMutableRawPointer?) {
    guard let hint else { return }
    let tracker = Unmanaged<ZMQReleaseTracker>.fromOpaque(hint).takeRetainedValue()
    tracker.released()
}

// MARK: - Socket

/// Socket types used by SqueezeTransport (and the usual neighbours).
public enum ZMQSocketType: Sendable {
    case pair, dealer, router, push, pull, pub, sub, req, rep

    var raw: Int32 {
        switch self {
        case .pair: ZMQ_PAIR
        case .dealer: ZMQ_DEALER
        case .router: ZMQ_ROUTER
        case .push: ZMQ_PUSH
        case .pull: ZMQ_PULL
        case .pub: ZMQ_PUB
        case .sub: ZMQ_SUB
        case .req: ZMQ_REQ
        case .rep: ZMQ_REP
        }
    }
}

/// A ZeroMQ socket. Not thread-safe (libzmq sockets are not): use it from one thread at a time.
public final class ZMQSocket: @unchecked Sendable {
    // @unchecked Sendable: libzmq allows moving a socket to another thread provided the
    // hand-over is a full memory barrier (thread start/join, a lock, a semaphore all are);
    // it must never be used by two threads at once, which is the documented contract here.
    private var handle: UnsafeMutableRawPointer?
    public let context: ZMQContext
    public let type: ZMQSocketType

    public init(context: ZMQContext, type: ZMQSocketType) throws(ZMQError) {
        guard let h = zmq_socket(context.handle, type.raw) else {
            throw ZMQError(zmq: zmq_errno(), function: "zmq_socket")
        }
        self.handle = h
        self.context = context
        self.type = type
        try setOption(ZMQ_LINGER, 0)
    }

    deinit { close() }

    /// Closes the socket (idempotent). By default linger is 0: queued outgoing messages
    /// are dropped. With `linger`, libzmq keeps trying to deliver them for that long in the
    /// background, and `ZMQContext.terminate()` waits for them (at most that long).
    public func close(linger: Duration? = nil) {
        guard let h = handle else { return }
        if let linger {
            var ms = Int32(pollMilliseconds(linger))
            zmq_setsockopt(h, ZMQ_LINGER, &ms, MemoryLayout<Int32>.size)
        }
        zmq_close(h)
        handle = nil
    }

    public var isClosed: Bool { handle == nil }

    func raw() throws(ZMQError) -> UnsafeMutableRawPointer {
        guard let h = handle else { throw ZMQError(zmq: ENOTSOCK, function: "ZMQSocket (already closed)") }
        return h
    }

    // MARK: Options

    public func setOption(_ option: Int32, _ value: Int32) throws(ZMQError) {
        let s = try raw()
        var v = value
        _ = try zmqCall("zmq_setsockopt") { zmq_setsockopt(s, option, &v, MemoryLayout<Int32>.size) }
    }

    public func setOption(_ option: Int32, int64 value: Int64) throws(ZMQError) {
        let s = try raw()
        var v = value
        _ = try zmqCall("zmq_setsockopt") { zmq_setsockopt(s, option, &v, MemoryLayout<Int64>.size) }
    }

    public func setOption(_ option: Int32, bytes: [UInt8]) throws(ZMQError) {
        let s = try raw()
        let rc = bytes.withUnsafeBytes { b in zmq_setsockopt(s, option, b.baseAddress, b.count) }
        if rc == -1 { throw ZMQError(zmq: zmq_errno(), function: "zmq_setsockopt") }
    }

    public func int32Option(_ option: Int32) throws(ZMQError) -> Int32 {
        let s = try raw()
        var v: Int32 = 0
        var size = MemoryLayout<Int32>.size
        _ = try zmqCall("zmq_getsockopt") { zmq_getsockopt(s, option, &v, &size) }
        return v
    }

    public func stringOption(_ option: Int32) throws(ZMQError) -> String {
        let s = try raw()
        var buffer = [UInt8](repeating: 0, count: 1024)
        var size = buffer.count
        _ = try zmqCall("zmq_getsockopt") { zmq_getsockopt(s, option, &buffer, &size) }
        let n = buffer.firstIndex(of: 0) ?? min(size, buffer.count)
        return String(decoding: buffer[..<n], as: UTF8.self)
    }

    /// ZMQ_SNDHWM: queued outgoing messages per peer before send blocks; 0 = unlimited.
    public func setSendHighWaterMark(_ messages: Int) throws(ZMQError) { try setOption(ZMQ_SNDHWM, Int32(messages)) }
    /// ZMQ_RCVHWM: queued incoming messages per peer; 0 = unlimited.
    public func setReceiveHighWaterMark(_ messages: Int) throws(ZMQError) { try setOption(ZMQ_RCVHWM, Int32(messages)) }
    /// ZMQ_ROUTING_ID: how a ROUTER peer names this socket (1...255 bytes, not starting with 0).
    public func setRoutingID(_ id: [UInt8]) throws(ZMQError) { try setOption(ZMQ_ROUTING_ID, bytes: id) }
    /// ZMQ_IMMEDIATE: queue messages only on completed connections.
    public func setImmediate(_ on: Bool) throws(ZMQError) { try setOption(ZMQ_IMMEDIATE, Int32(on ? 1 : 0)) }
    /// ZMQ_ROUTER_HANDOVER: a reconnecting peer with a known routing id takes over the old connection.
    public func setRouterHandover(_ on: Bool) throws(ZMQError) { try setOption(ZMQ_ROUTER_HANDOVER, Int32(on ? 1 : 0)) }
    /// ZMQ_TCP_KEEPALIVE (+ idle seconds): detect peers that vanished without closing.
    public func setTCPKeepAlive(_ on: Bool, idleSeconds: Int? = nil) throws(ZMQError) {
        try setOption(ZMQ_TCP_KEEPALIVE, Int32(on ? 1 : 0))
        if let idleSeconds { try setOption(ZMQ_TCP_KEEPALIVE_IDLE, Int32(idleSeconds)) }
    }
    /// ZMQ_SNDBUF and ZMQ_RCVBUF: kernel socket buffer sizes in bytes (-1 = OS default).
    public func setKernelBuffers(_ bytes: Int) throws(ZMQError) {
        try setOption(ZMQ_SNDBUF, Int32(bytes))
        try setOption(ZMQ_RCVBUF, Int32(bytes))
    }
    /// ZMQ_MAXMSGSIZE: larger inbound frames disconnect the peer; -1 = no limit.
    public func setMaxMessageSize(_ bytes: Int) throws(ZMQError) { try setOption(ZMQ_MAXMSGSIZE, int64: Int64(bytes)) }

    // MARK: Endpoints

    /// Binds, e.g. "tcp://127.0.0.1:*" (free port), "tcp://*:5555", "ipc:///tmp/x.sock", "ipc://*".
    public func bind(_ endpoint: String) throws(ZMQError) {
        let s = try raw()
        _ = try zmqCall("zmq_bind") { zmq_bind(s, endpoint) }
    }

    public func connect(_ endpoint: String) throws(ZMQError) {
        let s = try raw()
        _ = try zmqCall("zmq_connect") { zmq_connect(s, endpoint) }
    }

    public func disconnect(_ endpoint: String) throws(ZMQError) {
        let s = try raw()
        _ = try zmqCall("zmq_disconnect") { zmq_disconnect(s, endpoint) }
    }

    /// ZMQ_LAST_ENDPOINT: the endpoint actually bound, with wildcards resolved
    /// (e.g. "tcp://127.0.0.1:41234").
    public var lastEndpoint: String {
        get throws(ZMQError) { try stringOption(ZMQ_LAST_ENDPOINT) }
    }

    // MARK: Send

    /// Sends a copy of `bytes` as one frame. Returns false on EAGAIN (only with `dontWait`).
    @discardableResult
    public func send(_ bytes: UnsafeRawBufferPointer, more: Bool = false, dontWait: Bool = false) throws(ZMQError) -> Bool {
        let s = try raw()
        let flags = (more ? ZMQ_SNDMORE : 0) | (dontWait ? ZMQ_DONTWAIT : 0)
        return try zmqCall("zmq_send") { zmq_send(s, bytes.baseAddress, bytes.count, flags) } != nil
    }

    /// Sends `message` (zero-copy if it was made with `borrowing:`). On success the message
    /// is left empty; on EAGAIN (returns false) it still holds its content.
    @discardableResult
    public func send(_ message: ZMQMessage, more: Bool = false, dontWait: Bool = false) throws(ZMQError) -> Bool {
        let s = try raw()
        let flags = (more ? ZMQ_SNDMORE : 0) | (dontWait ? ZMQ_DONTWAIT : 0)
        return try zmqCall("zmq_msg_send") { zmq_msg_send(message.msg, s, flags) } != nil
    }

    /// Sends the frames as one multipart message (copies each frame).
    public func sendMultipart(_ frames: [UnsafeRawBufferPointer]) throws(ZMQError) {
        for (i, f) in frames.enumerated() {
            try send(f, more: i + 1 < frames.count)
        }
    }

    // MARK: Receive

    /// Waits up to `timeout` (nil: forever) for the socket to become readable.
    /// Returns false on timeout.
    public func waitReadable(timeout: Duration?) throws(ZMQError) -> Bool {
        try poll(events: Int16(ZMQ_POLLIN), timeout: timeout)
    }

    /// `zmq_poll` on this socket alone. An EINTR counts as "not ready" (the caller's loop retries).
    public func poll(events: Int16, timeout: Duration?) throws(ZMQError) -> Bool {
        var item = zmq_pollitem_t(socket: try raw(), fd: 0, events: events, revents: 0)
        let rc = zmq_poll(&item, 1, pollMilliseconds(timeout))
        if rc == -1 {
            let e = zmq_errno()
            if e == EINTR { return false }
            throw ZMQError(zmq: e, function: "zmq_poll")
        }
        return rc > 0 && (item.revents & events) != 0
    }

    /// Receives one frame into `message` (its previous content is released).
    /// Returns false on EAGAIN (only with `dontWait`).
    @discardableResult
    public func receive(into message: ZMQMessage, dontWait: Bool = false) throws(ZMQError) -> Bool {
        let s = try raw()
        return try zmqCall("zmq_msg_recv") { zmq_msg_recv(message.msg, s, dontWait ? ZMQ_DONTWAIT : 0) } != nil
    }

    /// Receives one frame, waiting up to `timeout` (nil: forever). Returns nil on timeout.
    public func receive(timeout: Duration?) throws(ZMQError) -> ZMQMessage? {
        let message = ZMQMessage()
        let deadline = timeout.map { ContinuousClock.now.advanced(by: $0) }
        while true {
            if try receive(into: message, dontWait: true) { return message }
            let remaining = deadline.map { $0 - ContinuousClock.now }
            if let remaining, remaining <= .zero { return nil }
            _ = try waitReadable(timeout: remaining)
        }
    }

    /// Receives all frames of one multipart message, waiting up to `timeout` for the first.
    /// Returns nil on timeout.
    public func receiveMultipart(timeout: Duration?) throws(ZMQError) -> [ZMQMessage]? {
        guard let first = try receive(timeout: timeout) else { return nil }
        var frames = [first]
        while frames[frames.count - 1].hasMore {
            let next = ZMQMessage()
            try receive(into: next)  // later frames of a multipart message arrive atomically
            frames.append(next)
        }
        return frames
    }
}
