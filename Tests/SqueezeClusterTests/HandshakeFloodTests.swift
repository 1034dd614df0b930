import CZeroMQ
import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
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
        // the ZAP handler and is refused. Fresh connections, many more than a monitor's queue holds
        // (about 2,000 events), while nobody calls the server's receive.
        let strangers = try ZMQContext()
        defer { strangers.terminate() }
        let other = try RunKey.generate()
        let deadline = Date().addingTimeInterval(90)
        while authenticator.refused < 5_000 && Date() < deadline {
            let before = authenticator.refused
            var sockets = [ZMQSocket]()
            for _ in 0..<100 {
                let s = try ZMQSocket(context: strangers, type: .dealer)
                try s.setOption(ZMQ_CURVE_SERVERKEY, bytes: Array(key.publicKey.utf8))
                try s.setOption(ZMQ_CURVE_PUBLICKEY, bytes: Array(other.publicKey.utf8))
                try s.setOption(ZMQ_CURVE_SECRETKEY, bytes: Array(other.secretKey.utf8))
                try s.connect(server.endpoint)
                sockets.append(s)
            }
            let batch = Date().addingTimeInterval(3)
            while authenticator.refused < before + 100 && Date() < batch { usleep(5_000) }
            for s in sockets { s.close() }
        }
        #expect(authenticator.refused >= 5_000, "refusals stopped at \(authenticator.refused): libzmq's I/O thread stalled")

        // A member's handshake still completes before the server receives anything (its receive would
        // drain the monitor), and then its message arrives.
        let member = try ZMQSocket(context: strangers, type: .dealer)
        defer { member.close() }
        try member.setRoutingID([1, 2, 3])
        try member.secureAsClient(.curve(key))
        let memberMonitor = try HandshakeMonitor(member)
        defer { memberMonitor.close() }
        try member.connect(server.endpoint)
        let handshake = Date().addingTimeInterval(30)
        while memberMonitor.succeeded == 0 && Date() < handshake { _ = memberMonitor.update(); usleep(20_000) }
        #expect(memberMonitor.succeeded == 1, "a member could not connect after the flood")
        try Array("hello".utf8).withUnsafeBytes { _ = try member.send($0) }
        #expect(try server.receive(timeout: .seconds(30))?.frame == Array("hello".utf8))
    }
}
