import CZeroMQ
import Foundation
import Testing
@testable import SqueezeComm

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
        #expect(try socket.int32Option(ZMQ_ZAP_ENFORCE_DOMAIN) == 1)
    }
}
