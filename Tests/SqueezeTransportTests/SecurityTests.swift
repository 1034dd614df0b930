import Foundation
import Testing
import CZeroMQ
@testable import SqueezeTransport

@Suite("Run keys, CURVE and the ZAP handler")
struct SecurityTests {
    func directory() throws -> String {
        let dir = NSTemporaryDirectory() + "squeezetrain-keys-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func keyFilesArePrivateNeverOverwrittenAndReadBack() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = try RunKey.generate()
        try key.write(to: dir + "/run.key")
        let mode = (try FileManager.default.attributesOfItem(atPath: dir + "/run.key")[.posixPermissions] as! NSNumber).intValue
        #expect(mode == 0o600)
        #expect(try RunKey.read(from: dir + "/run.key") == key)
        #expect(key.publicKey.count == 40 && key.publicKey != key.secretKey)
        #expect(throws: KeyFileError.self) { try RunKey.generate().write(to: dir + "/run.key") }
        #expect(try RunKey.read(from: dir + "/run.key") == key)  // untouched
    }

    @Test(arguments: [
        ("open", "squeezetrain-run-key-v1 0000000000000000000000000000000000000000\n", 0o644, "others can read it"),
        ("short", "squeezetrain-run-key-v1 abc\n", 0o600, "not 40 Z85 characters"),
        ("header", "ssh-rsa AAAA\n", 0o600, "does not start with"),
        ("two", "squeezetrain-run-key-v1 a\nsqueezetrain-run-key-v1 b\n", 0o600, "holds 2 key lines"),
        ("empty", "", 0o600, "holds 0 key lines"),
    ])
    func badKeyFilesAreRefusedNamingTheProblem(name: String, text: String, mode: Int, words: String) throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/" + name
        FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: mode])
        #expect { try RunKey.read(from: path) } throws: { "\($0)".contains(words) && "\($0)".contains(path) }
        #expect { try RunKey.read(from: dir + "/missing") } throws: { "\($0)".contains("cannot read key file") }
    }

    /// Two transports with the same key talk; a peer with another key, or none, gets nothing through.
    @Test func onlyTheRunKeyGetsThroughTheDataPlane() throws {
        let key = try RunKey.generate()
        let context = try ZMQContext()
        defer { context.terminate() }
        let refusals = Refusals()
        try context.authenticate(.curve(key)) { refusals.add($0) }
        var options = ZMQTransport.Options()
        options.security = .curve(key)
        let a = try ZMQTransport(rank: 0, worldSize: 2, bind: "tcp://127.0.0.1:*", context: context, options: options)
        let b = try ZMQTransport(rank: 1, worldSize: 2, bind: "tcp://127.0.0.1:*", context: context, options: options)
        defer { a.close(); b.close() }
        try b.connect(to: 0, endpoint: a.boundEndpoint)
        // Each stranger claims rank 1's routing id and queues a message; it stays open (its message
        // would be delivered if it got in) until the end of the test.
        var strangers = [ZMQSocket]()
        defer { for s in strangers { s.close() } }
        let other = try RunKey.generate()
        let cases: [(String, (ZMQSocket) throws -> Void, String)] = [
            // Another run's key: its hello is sealed for another server key, so it fails before ZAP.
            ("another run key", { try $0.secureAsClient(.curve(other)) }, "the handshake with"),
            // The server's public key, but a key pair of its own: the ZAP handler refuses it.
            ("another client key", { s in
                try s.setOption(ZMQ_CURVE_SERVERKEY, bytes: Array(key.publicKey.utf8))
                try s.setOption(ZMQ_CURVE_PUBLICKEY, bytes: Array(other.publicKey.utf8))
                try s.setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(other.secretKey.utf8))
            }, "refused this process's key (ZAP status 400)"),
            ("no key", { try $0.secureAsClient(.insecure) }, "the handshake with"),
        ]
        for (security, secure, words) in cases {
            let stranger = try ZMQSocket(context: context, type: .dealer)
            strangers.append(stranger)
            try stranger.setRoutingID(ZMQTransport.routingID(rank: 1))
            try secure(stranger)
            let monitor = try HandshakeMonitor(stranger)
            defer { monitor.close() }
            try stranger.connect(a.boundEndpoint)
            try [UInt8](repeating: 7, count: 8).withUnsafeBytes { _ = try stranger.send($0, more: true) }
            try [UInt8](repeating: 9, count: 8).withUnsafeBytes { _ = try stranger.send($0) }
            // Its handshake has finished, one way or the other, when the monitor reports it (bounded wait).
            let deadline = ContinuousClock.now + .seconds(20)
            while monitor.failed == 0 && monitor.succeeded == 0 && ContinuousClock.now < deadline {
                monitor.update()
                usleep(5_000)
            }
            #expect(monitor.succeeded == 0 && monitor.failed >= 1, "\(security): \(monitor.succeeded) handshake(s) succeeded, \(monitor.failed) failed")
            #expect(monitor.failure?.contains(words) == true, "\(security): \(monitor.failure ?? "no failure")")
        }
        #expect(context.authenticator?.refused == 1)  // the other client key; the others fail before ZAP
        #expect(refusals.all.count == 1 && refusals.all.first?.contains("a key that is not this run's") == true, "\(refusals.all)")
        try [UInt8](repeating: 1, count: 4).withUnsafeBytes { c in try [UInt8](repeating: 2, count: 4).withUnsafeBytes { try b.send(control: c, payload: $0, to: 0) } }
        let got = try a.receive(from: 1, timeout: .seconds(5)) { c, p in (Array(c), Array(p)) }
        #expect(got.0 == [1, 1, 1, 1] && got.1 == [2, 2, 2, 2])
        #expect(throws: CommError.self) { try a.receive(from: 1, timeout: .milliseconds(300)) { _, _ in () } }  // nothing else arrived
    }

    @Test func aCurveServerNeedsAZAPHandler() throws {
        let context = try ZMQContext()
        defer { context.terminate() }
        let socket = try ZMQSocket(context: context, type: .router)
        defer { socket.close() }
        #expect { try socket.secureAsServer(.curve(try RunKey.generate())) } throws: { "\($0)".contains("ZAP handler") }
    }

    @Test func ipcSocketsLiveInAPrivateDirectory() throws {
        let dir = try privateSocketDirectory()
        var info = stat()
        #expect(lstat(dir, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o700 && info.st_uid == getuid())
        #expect(try ipcEndpoint("rank0", pid: 42) == "ipc://\(dir)/42-rank0.ipc")
        chmod(dir, 0o755)
        defer { chmod(dir, 0o700) }
        #expect { try privateSocketDirectory() } throws: { "\($0)".contains("is not a private directory") }
    }
}

final class Refusals: @unchecked Sendable {
    // @unchecked Sendable: guarded by `lock`.
    private let lock = NSLock()
    private var lines = [String]()
    func add(_ s: String) { lock.withLock { lines.append(s) } }
    var all: [String] { lock.withLock { lines } }
}
