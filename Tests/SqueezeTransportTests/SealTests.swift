import Foundation
import Testing
import SqueezeCollectives
@testable import SqueezeTransport

// The sealed data plane (AES-256-GCM frames on plain sockets): what a process without the run key
// can do with the frames it sees on the wire. It captures real frames (a plain ROUTER stands where a
// rank's endpoint would be), then replays, reorders, reflects, redirects and alters them.

@Suite("The sealed data plane")
struct SealTests {
    let key: RunKey
    let salt: [UInt8]
    let context: ZMQContext

    init() throws {
        key = try RunKey.generate()
        salt = try DataPlaneSeal.randomSalt()
        context = try ZMQContext()
    }

    func sealed(rank: Int, worldSize: Int = 2, salt: [UInt8]? = nil) throws -> ZMQTransport {
        var options = ZMQTransport.Options()
        options.seal = try DataPlaneSeal(key: key, salt: salt ?? self.salt)
        return try ZMQTransport(rank: rank, worldSize: worldSize, bind: "tcp://127.0.0.1:*", context: context, options: options)
    }

    /// A plain ROUTER that records what a rank sends to it.
    func tap() throws -> ZMQSocket {
        let router = try ZMQSocket(context: context, type: .router)
        try router.bind("tcp://127.0.0.1:*")
        return router
    }

    /// The next [control, payload] the tap got (the routing id dropped).
    func captured(_ tap: ZMQSocket) throws -> [[UInt8]] {
        let frames = try #require(try tap.receiveMultipart(timeout: .seconds(5)))
        return frames.dropFirst().map { Array($0.bytes) }
    }

    /// A process without the key: a plain DEALER that sends `frames` to `endpoint`.
    func inject(_ messages: [[[UInt8]]], to endpoint: String, routingID: [UInt8]? = nil) throws -> ZMQSocket {
        let s = try ZMQSocket(context: context, type: .dealer)
        if let routingID { try s.setRoutingID(routingID) }
        try s.connect(endpoint)
        for m in messages { for (i, f) in m.enumerated() { try f.withUnsafeBytes { _ = try s.send($0, more: i + 1 < m.count) } } }
        return s
    }

    /// Rank 0 under test, receiving from rank 1 and sending to a tap; and a genuine rank 1 sending to a tap.
    func pair() throws -> (rank0: ZMQTransport, tap0: ZMQSocket, rank1: ZMQTransport, tap1: ZMQSocket) {
        let rank0 = try sealed(rank: 0), rank1 = try sealed(rank: 1)
        let tap0 = try tap(), tap1 = try tap()
        try rank0.connect(topology: .ring, endpoints: [rank0.boundEndpoint, try tap1.lastEndpoint])  // 0 sends to "1", receives from 1
        try rank1.connect(to: 0, endpoint: try tap0.lastEndpoint)
        return (rank0, tap0, rank1, tap1)
    }

    func header(sender: Int, step: Int) -> WireHeader {
        WireHeader(kind: .reduceScatter, sender: sender, tag: CollectiveTag(step: UInt32(step)), offset: 0, count: 16)
    }

    func send(_ t: ZMQTransport, _ value: UInt8, step: Int = 0, to peer: Int? = nil) throws {
        try header(sender: t.rank, step: step).encoded.withUnsafeBytes { h in
            try [UInt8](repeating: value, count: 64).withUnsafeBytes { try t.send(control: h, payload: $0, to: peer ?? 1 - t.rank) }
        }
    }

    /// A rank's frames of steps 1 and 2 (payload bytes 1 and 2), as an attacker on the wire captures them.
    func framesOfTwoSteps(from t: ZMQTransport, tap: ZMQSocket) throws -> (first: [[UInt8]], second: [[UInt8]]) {
        try send(t, 1, step: 1)
        try send(t, 2, step: 2)
        return (try captured(tap), try captured(tap))
    }

    func nothingMore(_ t: ZMQTransport) {
        #expect(throws: CommError.self) { try t.receive(from: 1, timeout: .milliseconds(300)) { _, _ in () } }
    }

    @Test func keysDifferByDirectionAndSaltAndAreReproducible() throws {
        let seal = try DataPlaneSeal(key: key, salt: salt)
        #expect(try seal.key(sender: 0, receiver: 1) == DataPlaneSeal(key: key, salt: salt).key(sender: 0, receiver: 1))
        #expect(try seal.key(sender: 0, receiver: 1) != seal.key(sender: 1, receiver: 0))
        #expect(try seal.key(sender: 0, receiver: 1) != DataPlaneSeal(key: key, salt: DataPlaneSeal.randomSalt()).key(sender: 0, receiver: 1))
        #expect(try seal.key(sender: 0, receiver: 1) != DataPlaneSeal(key: RunKey.generate(), salt: salt).key(sender: 0, receiver: 1))
        #expect(DataPlaneSeal.salt(hex: DataPlaneSeal.hex(salt)) == salt)
        #expect(DataPlaneSeal.salt(hex: "zz" + String(repeating: "0", count: 62)) == nil)
        #expect(throws: CommError.self) { try DataPlaneSeal(key: key, salt: [1, 2, 3]) }
    }

    /// Sealed frames travel on plain sockets, their payload the exact gradient bytes, their nonce and tag counted as control bytes.
    @Test func sealedFramesArriveIntactAndTheSealIsControlBytes() throws {
        let a = try sealed(rank: 0), b = try sealed(rank: 1)
        defer { a.close(); b.close() }
        try a.connect(topology: .ring, endpoints: [a.boundEndpoint, b.boundEndpoint])
        try b.connect(topology: .ring, endpoints: [a.boundEndpoint, b.boundEndpoint])
        try send(b, 42)
        let got = try a.receive(from: 1, timeout: .seconds(5)) { c, p in (try WireHeader.decode(c, from: 1), Array(p)) }
        #expect(got.0.sender == 1 && got.0.count == 16 && got.1 == [UInt8](repeating: 42, count: 64))
        #expect(b.counters.payloadBytesSent == 64 && b.counters.controlBytesSent == WireHeader.size + DataPlaneSeal.overheadBytes)
        #expect(a.counters.payloadBytesReceived == 64 && a.counters.controlBytesReceived == WireHeader.size + 28)
    }

    /// On the wire the gradient is not in the clear, and strangers' frames (plain, claiming rank 1's
    /// routing id, or shaped like a sealed frame) are dropped and counted while rank 1's get through.
    @Test func aProcessWithoutTheKeyGetsNoFrameAccepted() throws {
        let (rank0, tap0, rank1, tap1) = try pair()
        defer { rank0.close(); rank1.close(); tap0.close(); tap1.close() }
        try send(rank1, 42)
        let genuine = try captured(tap0)
        #expect(genuine[0].count == WireHeader.size + 28 && genuine[1].count == 64 && genuine[1] != [UInt8](repeating: 42, count: 64))
        var forged = genuine
        forged[1] = [UInt8](repeating: 9, count: 64)  // the attacker's gradient under a captured nonce and tag
        let header = WireHeader(kind: .reduceScatter, sender: 1, tag: CollectiveTag(step: 0), offset: 0, count: 16).encoded
        let strangers = [
            try inject([[header, [UInt8](repeating: 9, count: 64)]], to: rank0.boundEndpoint, routingID: ZMQTransport.routingID(rank: 1)),
            try inject([forged, [header + [UInt8](repeating: 0, count: 28), [UInt8](repeating: 9, count: 64)]], to: rank0.boundEndpoint),
        ]
        defer { for s in strangers { s.close() } }
        let wrongKey = try ZMQSocket(context: context, type: .dealer)  // a CURVE client meets a plain server: no handshake
        defer { wrongKey.close() }
        try wrongKey.secureAsClient(.curve(try RunKey.generate()))
        try wrongKey.connect(rank0.boundEndpoint)
        usleep(200_000)
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 3)
        let relay = try inject([genuine], to: rank0.boundEndpoint)  // rank 1's own frame, relayed: accepted once
        defer { relay.close() }
        #expect(try rank0.receive(from: 1, timeout: .seconds(5)) { _, p in Array(p) } == [UInt8](repeating: 42, count: 64))
    }

    /// A captured frame replayed, or an older one after a newer, is dropped and counted.
    @Test func replayedAndReorderedFramesAreDropped() throws {
        let (rank0, tap0, rank1, tap1) = try pair()
        defer { rank0.close(); rank1.close(); tap0.close(); tap1.close() }
        let (first, second) = try framesOfTwoSteps(from: rank1, tap: tap0)
        let attacker = try inject([second, first, second], to: rank0.boundEndpoint)
        defer { attacker.close() }
        #expect(try rank0.receive(from: 1, timeout: .seconds(5)) { _, p in Array(p) } == [UInt8](repeating: 2, count: 64))
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 2)
    }

    /// A newer frame delivered ahead of an older one held back verifies (it is genuine), but the
    /// collective's check of its header (step, bucket, chunk: the additional authenticated data)
    /// refuses it, naming the peer; the held-back frame then fails the counter: nothing is summed wrong.
    @Test func aFrameDeliveredAheadOfItsTurnFailsTheHeaderCheck() throws {
        let (rank0, tap0, rank1, tap1) = try pair()
        defer { rank0.close(); rank1.close(); tap0.close(); tap1.close() }
        let (first, second) = try framesOfTwoSteps(from: rank1, tap: tap0)
        let attacker = try inject([second, first], to: rank0.boundEndpoint)
        defer { attacker.close() }
        let expected = header(sender: 1, step: 1)
        #expect(throws: CommError.malformedMessage(peer: 1, reason: "tag step 2 bucket 0, expected step 1 bucket 0")) {
            try rank0.receive(from: 1, timeout: .seconds(5)) { c, p in try WireHeader.validate(control: c, payload: p, from: 1, expected: expected) }
        }
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 1)
    }

    /// In a group of three, rank 1's frame to rank 2, captured and delivered to rank 0 (which also
    /// receives from rank 1), as captured or with the nonce's receiver rewritten to 0, is dropped:
    /// the nonce names another receiver, and the frames from 1 to 2 have a key of their own.
    @Test func aFrameSentToAnotherReceiverIsDropped() throws {
        let rank0 = try sealed(rank: 0, worldSize: 3), rank1 = try sealed(rank: 1, worldSize: 3)
        let tap2 = try tap()
        defer { rank0.close(); rank1.close(); tap2.close() }
        try rank1.connect(to: 2, endpoint: try tap2.lastEndpoint)
        try rank1.connect(to: 0, endpoint: rank0.boundEndpoint)
        try send(rank1, 6, to: 2)
        let toRank2 = try captured(tap2)
        var readdressed = toRank2
        readdressed[0][WireHeader.size + 10] = 0  // nonce: receiver 0
        let attacker = try inject([toRank2, readdressed], to: rank0.boundEndpoint)
        defer { attacker.close() }
        usleep(200_000)
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 2)
        try send(rank1, 8, to: 0)  // rank 1's own frame to rank 0 still gets through
        #expect(try rank0.receive(from: 1, timeout: .seconds(5)) { _, p in Array(p) } == [UInt8](repeating: 8, count: 64))
    }

    /// Rank 0's own frame sent back to it (reflection), as captured or with the nonce's ranks swapped
    /// (misdirected), is dropped: the frames from 0 to 1 have a key of their own.
    @Test func reflectedAndMisdirectedFramesAreDropped() throws {
        let (rank0, tap0, rank1, tap1) = try pair()
        defer { rank0.close(); rank1.close(); tap0.close(); tap1.close() }
        try send(rank0, 5)
        let own = try captured(tap1)
        var swapped = own
        let n = WireHeader.size
        (swapped[0][n + 8], swapped[0][n + 10]) = (own[0][n + 10], own[0][n + 8])  // nonce: sender 1, receiver 0
        let attacker = try inject([own, swapped], to: rank0.boundEndpoint)
        defer { attacker.close() }
        usleep(200_000)
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 2)
    }

    /// One flipped bit anywhere (header, nonce, tag, ciphertext) and the frame is dropped; the intact one still gets through.
    @Test(arguments: [("header's step", 8), ("header's bucket", 12), ("header's offset (the chunk)", 16), ("nonce", WireHeader.size + 1),
                      ("tag", WireHeader.size + 20), ("ciphertext", -1)])
    func aFlippedBitIsDropped(part: String, byte: Int) throws {
        let (rank0, tap0, rank1, tap1) = try pair()
        defer { rank0.close(); rank1.close(); tap0.close(); tap1.close() }
        try send(rank1, 7)
        let genuine = try captured(tap0)
        var flipped = genuine
        if byte >= 0 { flipped[0][byte] ^= 0x10 } else { flipped[1][33] ^= 0x01 }
        let attacker = try inject([flipped, genuine], to: rank0.boundEndpoint)
        defer { attacker.close() }
        #expect(try rank0.receive(from: 1, timeout: .seconds(5)) { _, p in Array(p) } == [UInt8](repeating: 7, count: 64), "\(part)")
        #expect(rank0.droppedMessages == 1, "\(part)")
    }

    /// A frame of an earlier rendezvous (another salt: a step redone after a resume) does not open.
    @Test func aFrameOfAnotherRendezvousIsDropped() throws {
        let rank0 = try sealed(rank: 0), earlier = try sealed(rank: 1, salt: try DataPlaneSeal.randomSalt())
        defer { rank0.close(); earlier.close() }
        try rank0.connect(topology: .ring, endpoints: [rank0.boundEndpoint, earlier.boundEndpoint])
        try earlier.connect(to: 0, endpoint: rank0.boundEndpoint)
        try send(earlier, 3)
        usleep(200_000)
        nothingMore(rank0)
        #expect(rank0.droppedMessages == 1)
    }
}
