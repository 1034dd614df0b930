// Who may talk to a run: ZeroMQ's CURVE (elliptic-curve authenticated encryption, RFC 26) with one
// key pair per run that every process of the run holds, and a ZAP handler (RFC 27) that admits a
// peer only if it proved it holds that key.
//
// Every server socket (the coordinator's control ROUTER, each rank's data-plane ROUTER) is a CURVE
// server with the run's secret key; every client socket (a worker's DEALERs) is a CURVE client whose
// own key pair is the run's too, and which expects the run's public key from the server. A peer
// without the secret key cannot finish the handshake (it cannot decrypt the server's cookie, nor
// prove the client key in INITIATE), so libzmq drops it before a single message reaches the
// program; the ZAP handler additionally refuses every client key but the run's.

import CZeroMQ
import Foundation
import SqueezeSystem

/// A run's shared secret: one CURVE key pair. Anyone who reads the key file can join the run,
/// send it gradients and stop it; anyone who does not cannot even complete a connection.
public struct RunKey: Sendable, Equatable {
    /// Z85, 40 characters.
    public let secretKey: String
    /// Z85, 40 characters (derived from the secret key).
    public let publicKey: String

    static let header = "squeezetrain-run-key-v1"

    /// A fresh random key pair (libsodium's, through `zmq_curve_keypair`).
    public static func generate() throws -> RunKey {
        var pub = [CChar](repeating: 0, count: 41), sec = [CChar](repeating: 0, count: 41)
        guard zmq_curve_keypair(&pub, &sec) == 0 else {
            throw ZMQError(zmq: zmq_errno(), function: "zmq_curve_keypair")
        }
        return try RunKey(secretKey: String(cString: sec))
    }

    /// The key pair of a Z85 secret key; an error if it is not 40 Z85 characters.
    public init(secretKey: String) throws {
        guard secretKey.utf8.count == 40, var decoded = z85Decode(secretKey), decoded.count == 32 else {
            throw KeyFileError("the secret key is not 40 Z85 characters")
        }
        defer { for i in decoded.indices { decoded[i] = 0 } }
        var pub = [CChar](repeating: 0, count: 41)
        guard zmq_curve_public(&pub, secretKey) == 0 else { throw ZMQError(zmq: zmq_errno(), function: "zmq_curve_public") }
        self.secretKey = secretKey
        self.publicKey = String(cString: pub)
    }

    /// The public key's 32 bytes (what a ZAP request carries).
    var publicKeyBytes: [UInt8] { z85Decode(publicKey)! }

    /// The file's text: a comment line and the versioned key line.
    var fileText: String {
        "# squeezetrain run key: whoever can read this file can join and steer the run. Keep it mode 0600.\n"
            + "\(Self.header) \(secretKey)\n"
    }

    /// Writes a new key file: mode 0600, never over an existing file (O_EXCL), synced to disk.
    public func write(to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            let e = errno
            if e == EEXIST { throw KeyFileError("\(path) already exists; a key file is never overwritten (remove it first, or choose another path)") }
            throw KeyFileError("cannot create \(path): \(String(cString: strerror(e)))")
        }
        var failure: Error?
        do {
            _ = try systemCallRequired("fchmod", operation: "set mode 0600 on '\(path)'") { fchmod(fd, 0o600) }  // whatever the umask
            let bytes = Array(fileText.utf8)
            var written = 0
            while written < bytes.count {
                written += try bytes[written...].withUnsafeBytes { b in
                    try systemCallRequired("write", operation: "write '\(path)'") { Glibc.write(fd, b.baseAddress, b.count) }
                }
            }
            _ = try systemCallRequired("fsync", operation: "sync '\(path)'") { fsync(fd) }
        } catch { failure = error }
        close(fd)
        if let failure {
            unlink(path)
            throw failure
        }
    }

    /// Reads a key file, refusing one that others could read (as ssh refuses a private key) and
    /// anything that is not exactly one key line.
    public static func read(from path: String) throws -> RunKey {
        var info = stat()
        guard stat(path, &info) == 0 else { throw KeyFileError("cannot read key file \(path): \(String(cString: strerror(errno)))") }
        guard info.st_mode & S_IFMT == S_IFREG else { throw KeyFileError("key file \(path) is not a regular file") }
        guard info.st_mode & 0o077 == 0 else {
            throw KeyFileError("key file \(path) has mode \(String(info.st_mode & 0o777, radix: 8)): others can read it and so join the run; "
                               + "make it private with chmod 600 (Kubernetes: defaultMode 0400 on the Secret volume)")
        }
        guard info.st_size <= 4096 else { throw KeyFileError("key file \(path) is \(info.st_size) bytes; a key file is one short line") }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw KeyFileError("cannot read key file \(path): \(String(cString: strerror(errno)))")
        }
        let lines = String(decoding: data, as: UTF8.self).split(whereSeparator: \.isNewline)
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty && !$0.hasPrefix("#") }
        guard lines.count == 1 else {
            throw KeyFileError("key file \(path) holds \(lines.count) key lines; expected one \"\(header) …\" line (make one with squeezetrain keygen)")
        }
        let parts = lines[0].split(separator: " ", omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0] == header else {
            throw KeyFileError("key file \(path) does not start with \"\(header)\" (make one with squeezetrain keygen)")
        }
        do { return try RunKey(secretKey: String(parts[1])) } catch { throw KeyFileError("key file \(path): \(error)") }
    }
}

public struct KeyFileError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// How a process's sockets meet their peers.
public enum PeerSecurity: Sendable, Equatable {
    /// CURVE with the run's key on every socket, and a ZAP handler on every context that has a server socket.
    case curve(RunKey)
    /// Plain ZMTP: whoever reaches a port can join the run, send gradients and read them.
    case insecure
    /// Plain ZMTP on ipc sockets inside `privateSocketDirectory()` only (a run without a key): the
    /// directory's mode 0700 lets no other user reach them. A tcp socket is refused (`privateIPCRefusal`).
    case privateIPC

    public var isEncrypted: Bool { if case .curve = self { true } else { false } }
}

/// Z85 to bytes (nil if `text` is not Z85 of a multiple of 5 characters).
func z85Decode(_ text: String) -> [UInt8]? {
    guard text.utf8.count % 5 == 0 else { return nil }
    var out = [UInt8](repeating: 0, count: text.utf8.count * 4 / 5)
    return zmq_z85_decode(&out, text) == nil ? nil : out
}

// MARK: - Sockets

/// Handshakes that have not finished after this long are dropped (ZMQ_HANDSHAKE_IVL): an idle
/// connection costs a descriptor for at most this long.
let handshakeTimeoutMilliseconds: Int32 = 5_000

extension ZMQSocket {
    /// Makes a socket that binds a CURVE server (it must be called before `bind`). Peers are
    /// then checked by the context's `ZAPAuthenticator`, which must be running.
    public func secureAsServer(_ security: PeerSecurity) throws {
        try setOption(ZMQ_HANDSHAKE_IVL, handshakeTimeoutMilliseconds)
        guard case .curve(let key) = security else { return }
        guard context.authenticator != nil else {
            throw KeyFileError("internal error: a CURVE server socket on a context without a ZAP handler would admit any client")
        }
        try setOption(ZMQ_CURVE_SERVER, 1)
        try setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(key.secretKey.utf8))
        try setOption(ZMQ_ZAP_DOMAIN, bytes: Array(ZAPAuthenticator.domain.utf8))
        // Without this libzmq admits every client when no ZAP handler answers (its thread ended).
        try setOption(zapEnforceDomain, 1)
    }

    /// Makes a socket that connects a CURVE client holding the run's key pair (before `connect`).
    public func secureAsClient(_ security: PeerSecurity) throws {
        try setOption(ZMQ_HANDSHAKE_IVL, handshakeTimeoutMilliseconds)
        guard case .curve(let key) = security else { return }
        try setOption(ZMQ_CURVE_SERVERKEY, bytes: Array(key.publicKey.utf8))
        try setOption(ZMQ_CURVE_PUBLICKEY, bytes: Array(key.publicKey.utf8))
        try setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(key.secretKey.utf8))
    }
}

// MARK: - ZAP

/// ZMQ_ZAP_ENFORCE_DOMAIN: refuse clients when no ZAP handler answers, instead of admitting them.
/// libzmq 4.3 implements it; its header declares it only among the draft options.
let zapEnforceDomain: Int32 = 93

/// The context's ZAP handler: a thread answering libzmq's authentication requests on
/// inproc://zeromq.zap.01. Admits CURVE clients whose public key is the run's; refuses everything
/// else (another key, another mechanism) and counts it, logging at a bounded rate.
///
/// It must be running before a CURVE server socket of the context accepts a connection, so start it
/// right after the context. It ends when the context is terminated. Should it end for any other
/// reason, it fails closed: the server sockets enforce the ZAP domain (`secureAsServer`), so libzmq
/// refuses every client from then on, and `onFailure` is called (the command-line tool exits).
public final class ZAPAuthenticator: @unchecked Sendable {
    // @unchecked Sendable: the socket is used by the handler thread only; `refusedCount` and
    // `failAtNextRequest` are guarded by `lock`.
    static let domain = "squeezetrain"
    private let lock = NSLock()
    private var refusedCount = 0
    private var failAtNextRequest = false
    private let log: RateLimitedLog

    /// Clients refused so far.
    public var refused: Int { lock.withLock { refusedCount } }

    public init(context: ZMQContext, key: RunKey, log: @escaping @Sendable (String) -> Void,
                onFailure: @escaping @Sendable (String) -> Void = { _ in }) throws {
        self.log = RateLimitedLog(interval: .seconds(5), log)
        let socket = try ZMQSocket(context: context, type: .rep)
        try socket.bind("inproc://zeromq.zap.01")
        let allowed = key.publicKeyBytes
        let box = SocketBox(socket)
        Thread { [self] in
            do {
                try serve(box.socket, allowed: allowed)
            } catch let e as ZMQError where e.code == ETERM {
                box.socket.close()  // the context is shutting down
            } catch {
                box.socket.close()
                let reason = "the ZAP handler stopped (\(error)): every connection is refused from now on"
                log(reason)
                onFailure(reason)
            }
        }.start()
    }

    /// Answers requests until an error (ETERM when the context is terminated).
    private func serve(_ socket: ZMQSocket, allowed: [UInt8]) throws {
        while true {
            guard let request = try socket.receiveMultipart(timeout: nil) else { continue }
            if lock.withLock({ failAtNextRequest }) { throw ZMQError(zmq: EPROTO, function: "ZAPAuthenticator (a test's failure)") }
            let frames = request.map { $0.withUnsafeBytes { Array($0) } }
            let (status, reason) = decide(frames, allowed: allowed)
            let id = frames.count > 1 ? frames[1] : []
            let reply: [[UInt8]] = [Array("1.0".utf8), id, Array(status.utf8), Array(reason.utf8), status == "200" ? Array("run".utf8) : [], []]
            for (i, f) in reply.enumerated() { try f.withUnsafeBytes { _ = try socket.send($0, more: i + 1 < reply.count) } }
        }
    }

    /// Tests: the handler thread fails at the next request, as an unexpected error would make it.
    func failAtNextRequestForTesting() { lock.withLock { failAtNextRequest = true } }

    /// "200" for the run's CURVE key, "400" (with the reason, logged) for anything else.
    private func decide(_ frames: [[UInt8]], allowed: [UInt8]) -> (String, String) {
        // version, request id, domain, address, routing id, mechanism, credentials…
        let address = frames.count > 3 ? String(decoding: frames[3], as: UTF8.self) : "?"
        let reason: String
        if frames.count < 6 || frames[0] != Array("1.0".utf8) {
            reason = "malformed ZAP request"
        } else if frames[5] != Array("CURVE".utf8) {
            reason = "mechanism \(String(decoding: frames[5], as: UTF8.self)), not CURVE"
        } else if frames.count != 7 || frames[6] != allowed {
            reason = "a key that is not this run's"
        } else {
            return ("200", "OK")
        }
        let n = lock.withLock { refusedCount += 1; return refusedCount }
        log.line("refused a connection from \(address): \(reason) (\(n) refused so far)")
        return ("400", reason)
    }
}

private final class SocketBox: @unchecked Sendable {
    // @unchecked Sendable: handed to one thread at its start (a full barrier) and used only there.
    let socket: ZMQSocket
    init(_ socket: ZMQSocket) { self.socket = socket }
}

// MARK: - Handshake monitor

/// Watches one socket's handshakes (`zmq_socket_monitor`), so that a client whose key the server
/// refused can say so instead of waiting out its timeout: libzmq itself just retries quietly.
///
/// A thread of its own drains the events as they come and keeps only counts and the last failure:
/// libzmq's I/O thread blocks on a monitor whose queue is full, so events left waiting for the owner's
/// next receive (a flood of failed handshakes during a long step) would stall every socket of the context.
public final class HandshakeMonitor: @unchecked Sendable {
    // @unchecked Sendable: the counters are guarded by `lock`; `pair` is used by the drain thread only,
    // `socket` by its owner's thread only (`close`).
    private let lock = NSLock()
    private let socket: ZMQSocket
    private var running = true
    private var succeededCount = 0, failedCount = 0, reported = 0
    private var lastFailure: String?
    private var disconnected = [Int32]()

    public init(_ socket: ZMQSocket) throws {
        self.socket = socket
        let endpoint = "inproc://squeezetrain-monitor-\(UUID().uuidString)"
        let events = ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL
            | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_DISCONNECTED
        let raw = try socket.raw()
        _ = try zmqCall("zmq_socket_monitor") { zmq_socket_monitor(raw, endpoint, events) }
        let pair = try ZMQSocket(context: socket.context, type: .pair)
        try pair.connect(endpoint)
        let box = SocketBox(pair)
        Thread { [self] in drain(box.socket) }.start()
    }

    /// Handshakes that succeeded so far.
    public var succeeded: Int { lock.withLock { succeededCount } }
    /// Handshakes that failed so far.
    public var failed: Int { lock.withLock { failedCount } }
    /// The last failed handshake, as text, if no handshake succeeded since.
    public var failure: String? { lock.withLock { lastFailure } }

    /// The last handshake failure since the previous call, as text (nil if none failed since); never blocks.
    public func update() -> String? {
        lock.withLock {
            defer { reported = failedCount }
            return failedCount > reported ? lastFailure : nil
        }
    }

    /// The descriptors of the connections that dropped since the previous call (oldest first); never blocks.
    public func takeDisconnected() -> [Int32] {
        lock.withLock {
            defer { disconnected = [] }
            return disconnected
        }
    }

    /// Stops watching (from the thread that owns the socket, before closing it); the drain thread ends.
    public func close() {
        if let raw = try? socket.raw() { zmq_socket_monitor(raw, nil, 0) }
        lock.withLock { running = false }
    }

    /// The drain thread: reads events until `close` (or the context's end), then closes `pair`.
    private func drain(_ pair: ZMQSocket) {
        defer { pair.close() }
        let frame = ZMQMessage()
        while lock.withLock({ running }) {
            do {
                guard try pair.waitReadable(timeout: .milliseconds(100)) else { continue }
                while try pair.receive(into: frame, dontWait: true) {
                    var event: UInt16 = 0, value: UInt32 = 0
                    if frame.count == 6 {
                        frame.withUnsafeBytes { b in
                            event = b.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
                            value = b.loadUnaligned(fromByteOffset: 2, as: UInt32.self)
                        }
                    }
                    var address = ""
                    while frame.hasMore { try pair.receive(into: frame); address = String(decoding: frame.bytes, as: UTF8.self) }
                    record(Int32(event), value: value, address: address)
                }
            } catch {
                return  // ETERM: the context is ending
            }
        }
    }

    private func record(_ event: Int32, value: UInt32, address: String) {
        let text: String
        switch event {
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
            lock.withLock { succeededCount += 1; lastFailure = nil }
            return
        case ZMQ_EVENT_DISCONNECTED:
            lock.withLock { disconnected.append(Int32(bitPattern: value)) }
            return
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
            text = "\(address) refused this process's key (ZAP status \(value))"
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL, ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            text = "the handshake with \(address) failed (\(event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL ? "protocol error \(value)" : "connection dropped")): "
                + "the other side holds another key, or none"
        default:
            return
        }
        lock.withLock { failedCount += 1; lastFailure = text }
    }
}
