import CZeroMQ
import Foundation
import Testing
import SqueezeComm
@testable import SqueezeCluster

/// A flood of failed handshakes against the coordinator's control socket, while the coordinator does
/// not receive (a long rendezvous poll, a busy step): its monitor's events must not fill up and stall
/// libzmq's I/O thread, which would stop every handshake and message of the process.
@Suite("Handshake-monitor flood")
struct HandshakeFloodTests {
    @Test func failedHandshakesNeverStallTheIOThread() throws {
        let key = try RunKey.generate()
        let context = try ZMQContext()
        defer { context.terminate() }
        try context.authenticate(.curve(key)) { _ in }
        let server = try ZMQControlServer(context: context, bind: "tcp://127.0.0.1:*", security: .curve(key))
        defer { server.close() }
        let authenticator = try #require(context.authenticator)

        // Strangers that know the server's public key but hold another key pair: each handshake reaches
        // the ZAP handler, is refused, and the stranger reconnects at once.
        let strangers = try ZMQContext()
        defer { strangers.terminate() }
        let other = try RunKey.generate()
        var sockets = [ZMQSocket]()
        defer { for s in sockets { s.close() } }
        for _ in 0..<50 {
            let s = try ZMQSocket(context: strangers, type: .dealer)
            try s.setOption(ZMQ_RECONNECT_IVL, 5)
            try s.setOption(ZMQ_CURVE_SERVERKEY, bytes: Array(key.publicKey.utf8))
            try s.setOption(ZMQ_CURVE_PUBLICKEY, bytes: Array(other.publicKey.utf8))
            try s.setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(other.secretKey.utf8))
            try s.connect(server.endpoint)
            sockets.append(s)
        }
        // Far more refusals than a monitor's queue holds (about 2,000 events), with nobody calling receive.
        let deadline = Date().addingTimeInterval(90)
        while authenticator.refused < 6_000 && Date() < deadline { usleep(50_000) }
        #expect(authenticator.refused >= 6_000, "refusals stopped at \(authenticator.refused): libzmq's I/O thread stalled")
        for s in sockets { s.close() }
        sockets.removeAll()

        // A member still gets through, and the server reports the flood without being stalled by it.
        let member = try ZMQControlClient(context: strangers, coordinator: server.endpoint, identity: [1, 2, 3], security: .curve(key))
        defer { member.close() }
        try member.send(Array("hello".utf8))
        let received = try server.receive(timeout: .seconds(30))
        #expect(received?.frame == Array("hello".utf8))
    }
}
