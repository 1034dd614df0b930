import CZeroMQ
import Foundation
import Testing
import SqueezeTestSupport
@testable import SqueezeTransport

@Suite("ZeroMQ wrapper")
struct ZMQWrapperTests {
    @Test("binding to a wildcard port reads back the chosen endpoint")
    func boundEndpoint() throws {
        let context = try ZMQContext()
        let socket = try ZMQSocket(context: context, type: .pull)
        try socket.bind("tcp://127.0.0.1:*")
        let endpoint = try socket.lastEndpoint
        #expect(endpoint.hasPrefix("tcp://127.0.0.1:"))
        let port = Int(endpoint.split(separator: ":").last!)
        #expect(port != nil && port! > 0)
    }

    @Test("failures carry errno, function and zmq_strerror text")
    func errors() throws {
        let context = try ZMQContext()
        let socket = try ZMQSocket(context: context, type: .pair)
        do {
            try socket.bind("nonsense://x")
            Issue.record("bind should fail")
        } catch {
            #expect(error.function == "zmq_bind")
            #expect(error.code == EPROTONOSUPPORT)
            #expect(error.message == String(cString: zmq_strerror(EPROTONOSUPPORT)))
            #expect(error.description.contains("zmq_bind"))
        }
    }

    @Test("receive with a timeout returns nil when nothing arrives")
    func receiveTimeout() throws {
        let context = try ZMQContext()
        let pull = try ZMQSocket(context: context, type: .pull)
        try pull.bind("tcp://127.0.0.1:*")
        #expect(try pull.receive(timeout: .milliseconds(10)) == nil)
        let message = ZMQMessage()
        #expect(try pull.receive(into: message, dontWait: true) == false)  // EAGAIN is not an error
    }

    @Test("large and multipart messages arrive whole (no truncation), zero-copy buffers are released")
    func roundTrip() throws {
        let context = try ZMQContext()
        let pull = try ZMQSocket(context: context, type: .pull)
        try pull.bind(uniqueIPCEndpoint("wrapper"))
        let push = try ZMQSocket(context: context, type: .push)
        try push.connect(try pull.lastEndpoint)

        let big = rankData(rank: 3, count: 750_000)  // 3 MB
        let tracker = ZMQReleaseTracker()
        try big.withUnsafeBytes { bytes in
            try push.send(ZMQMessage(borrowing: bytes, tracker: tracker))
            let received = try #require(try pull.receive(timeout: .seconds(30)))
            #expect(received.count == bytes.count)
            #expect(received.bytes.elementsEqual(bytes))
            // Sent and received, so libzmq must let go of the borrowed buffer.
            #expect(tracker.waitUntilAllReleased(timeout: .seconds(30)))
            #expect(tracker.outstandingLoans == 0)
        }

        let parts: [[UInt8]] = [[1, 2, 3], [], Array(repeating: 7, count: 1000)]
        try parts[0].withUnsafeBytes { a in
            try parts[1].withUnsafeBytes { b in
                try parts[2].withUnsafeBytes { c in try push.sendMultipart([a, b, c]) }
            }
        }
        let frames = try #require(try pull.receiveMultipart(timeout: .seconds(30)))
        #expect(frames.map { Array($0.bytes) } == parts)
        #expect(frames.map(\.hasMore) == [true, true, false])
    }

    @Test("socket options: routing id, high-water marks, keepalive, immediate")
    func options() throws {
        let context = try ZMQContext()
        let dealer = try ZMQSocket(context: context, type: .dealer)
        try dealer.setRoutingID(ZMQTransport.routingID(rank: 258))
        try dealer.setSendHighWaterMark(0)
        try dealer.setReceiveHighWaterMark(5)
        try dealer.setTCPKeepAlive(true, idleSeconds: 30)
        try dealer.setImmediate(true)
        #expect(try dealer.int32Option(ZMQ_SNDHWM) == 0)
        #expect(try dealer.int32Option(ZMQ_RCVHWM) == 5)
        #expect(try dealer.int32Option(ZMQ_LINGER) == 0)
        #expect(try dealer.int32Option(ZMQ_IMMEDIATE) == 1)
        #expect(ZMQTransport.routingID(rank: 258) == [0x52, 2, 1, 0, 0])
        dealer.close()
        #expect(dealer.isClosed)
        #expect(throws: ZMQError.self) { try dealer.connect("tcp://127.0.0.1:1") }
    }
}
