import CZeroMQ
import Foundation
import Testing
@testable import SqueezeTransport

/// The ZAP handler fails closed: libzmq admits any CURVE client when no handler answers, unless the
/// socket enforces its ZAP domain.
@Suite("ZAP handler fails closed")
struct ZAPHandlerTests {
    @Test func curveServersEnforceTheirZAPDomain() throws {
        let context = try ZMQContext()
        defer { context.terminate() }
        try context.authenticate(.curve(try RunKey.generate())) { _ in }
        let socket = try ZMQSocket(context: context, type: .router)
        defer { socket.close() }
        try socket.secureAsServer(.curve(try RunKey.generate()))
        #expect(try socket.int32Option(93) == 1)  // ZMQ_ZAP_ENFORCE_DOMAIN (a draft option in libzmq 4.3's header)
    }

    /// A handler thread that ends for any reason but the context's end: every client is refused from
    /// then on, the right key too, and the owner is told (the command-line tool exits).
    @Test func aHandlerThatStopsAdmitsNobodyAndSaysSo() throws {
        let key = try RunKey.generate()
        let context = try ZMQContext()
        defer { context.terminate() }
        let stopped = Refusals()
        try context.authenticate(.curve(key), log: { _ in }, onFailure: { stopped.add($0) })
        let server = try ZMQSocket(context: context, type: .router)
        defer { server.close() }
        try server.secureAsServer(.curve(key))
        try server.bind("tcp://127.0.0.1:*")
        let endpoint = try server.lastEndpoint
        try #require(context.authenticator).failAtNextRequestForTesting()

        let clients = try ZMQContext()
        defer { clients.terminate() }
        var sockets = [ZMQSocket]()
        defer { for s in sockets { s.close() } }
        // The first member's handshake ends the handler; the next ones find none and are refused.
        for attempt in 0..<2 {
            let member = try ZMQSocket(context: clients, type: .dealer)
            sockets.append(member)
            try member.secureAsClient(.curve(key))
            let monitor = try HandshakeMonitor(member)
            defer { monitor.close() }
            try member.connect(endpoint)
            try Array("hello".utf8).withUnsafeBytes { _ = try member.send($0, dontWait: true) }
            if attempt == 0 {
                let deadline = Date().addingTimeInterval(30)
                while stopped.all.isEmpty && Date() < deadline { usleep(20_000) }
                #expect(stopped.all.first?.contains("the ZAP handler stopped") == true, "\(stopped.all)")
                continue
            }
            let deadline = Date().addingTimeInterval(30)
            while monitor.failed == 0 && Date() < deadline { usleep(20_000) }
            #expect(monitor.failed > 0 && monitor.succeeded == 0, "a member's handshake succeeded without a ZAP handler")
        }
        #expect(try server.receiveMultipart(timeout: .milliseconds(200)) == nil)  // nothing got through
    }
}
