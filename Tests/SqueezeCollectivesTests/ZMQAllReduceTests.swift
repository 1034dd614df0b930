import Foundation
import Testing
@testable import SqueezeCollectives
import SqueezeTestSupport
@testable import SqueezeTransport

/// Runs a ring all-reduce on each transport of `group` (one thread per rank).
private func zmqRing(_ group: [ZMQTransport], inputs: [[Float]], chunkBytes: Int) throws -> [RankOutcome] {
    let options = CollectiveOptions(chunkBytes: chunkBytes, timeout: .seconds(60))
    return try runRanks(group.count) { rank in
        let ring = RingAllReduce(transport: group[rank], options: options)
        var buffer = inputs[rank]
        for step in 0..<3 {  // several rounds on the same sockets; the last result is kept
            buffer = inputs[rank]
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: UInt32(step)))
        }
        return RankOutcome(result: buffer, counters: group[rank].counters)
    }.map { try $0.get() }
}

private func checkRing(_ outcomes: [RankOutcome], inputs: [[Float]], chunkBytes: Int) {
    let n = inputs.count, count = inputs[0].count
    let reference = ringReference(inputs)
    #expect(maxToleranceViolation(outcomes[0].result, exact: doubleAverage(inputs), inputs: inputs) <= 1)
    for r in 0..<n {
        #expect(firstMismatch(outcomes[r].result, reference) == nil, "rank \(r) differs from the reference")
        let expected = ringPayloadBytes(count: count, worldSize: n, rank: r)
        let messages = ringMessages(count: count, worldSize: n, rank: r, chunkBytes: chunkBytes)
        let c = outcomes[r].counters
        #expect(c.payloadBytesSent == 3 * expected.sent)
        #expect(c.payloadBytesReceived == 3 * expected.received)
        #expect(c.controlBytesSent == 3 * messages.sent * WireHeader.size)
        #expect(c.controlBytesReceived == 3 * messages.received * WireHeader.size)
        #expect(c.framingBytesSent > 0 && c.framingBytesSent <= 3 * messages.sent * 18)
    }
}

@Suite("All-reduce over ZMQTransport")
struct ZMQAllReduceTests {
    @Test("ring, 3 ranks as threads, tcp://127.0.0.1")
    func ringTCP() throws {
        let inputs = (0..<3).map { rankData(rank: $0, count: 300_007, salt: 9) }
        let group = try ZMQTransport.localGroup(worldSize: 3, topology: .ring)
        let chunk = 64 << 10
        checkRing(try zmqRing(group, inputs: inputs, chunkBytes: chunk), inputs: inputs, chunkBytes: chunk)
    }

    @Test("ring, 3 ranks as threads, ipc://, shared context, small chunks")
    func ringIPC() throws {
        let inputs = (0..<3).map { rankData(rank: $0, count: 20_011, salt: 10) }
        let context = try ZMQContext()
        let group = try (0..<3).map {
            try ZMQTransport(rank: $0, worldSize: 3, bind: uniqueIPCEndpoint("ring\($0)"), context: context)
        }
        for t in group { try t.connect(topology: .ring, endpoints: group.map(\.boundEndpoint)) }
        #expect(group[0].boundEndpoint.hasPrefix("ipc://"))
        let chunk = 1000  // 250 Floats: many chunks, mostly copied (below the zero-copy threshold)
        checkRing(try zmqRing(group, inputs: inputs, chunkBytes: chunk), inputs: inputs, chunkBytes: chunk)
    }

    @Test("ring, 3 ranks over tcp, sealed: the reference's bits, exact payload, header + nonce + tag per message as control bytes")
    func ringSealed() throws {
        let inputs = (0..<3).map { rankData(rank: $0, count: 300_007, salt: 13) }
        var options = ZMQTransport.Options()
        options.seal = try DataPlaneSeal(key: RunKey.generate(), salt: DataPlaneSeal.randomSalt())
        let group = try ZMQTransport.localGroup(worldSize: 3, topology: .ring, options: options)
        let chunk = 64 << 10
        let outcomes = try zmqRing(group, inputs: inputs, chunkBytes: chunk)
        let reference = ringReference(inputs)
        for r in 0..<3 {
            #expect(firstMismatch(outcomes[r].result, reference) == nil, "rank \(r) differs from the reference")
            let expected = ringPayloadBytes(count: 300_007, worldSize: 3, rank: r)
            let messages = ringMessages(count: 300_007, worldSize: 3, rank: r, chunkBytes: chunk)
            let c = outcomes[r].counters
            #expect(c.payloadBytesSent == 3 * expected.sent && c.payloadBytesReceived == 3 * expected.received)
            #expect(c.controlBytesSent == 3 * messages.sent * (WireHeader.size + DataPlaneSeal.overheadBytes))
            #expect(c.controlBytesReceived == 3 * messages.received * (WireHeader.size + DataPlaneSeal.overheadBytes))
        }
        #expect(group.map(\.droppedMessages) == [0, 0, 0])
    }

    @Test("ring of 2 and of 1 over tcp")
    func ringSmallWorlds() throws {
        for n in [1, 2] {
            let inputs = (0..<n).map { rankData(rank: $0, count: 727_626, salt: UInt64(n)) }
            let group = try ZMQTransport.localGroup(worldSize: n, topology: .ring)
            let chunk = 256 << 10
            let outcomes = try zmqRing(group, inputs: inputs, chunkBytes: chunk)
            checkRingWorld(outcomes, inputs: inputs, chunk: chunk)
        }
    }

    private func checkRingWorld(_ outcomes: [RankOutcome], inputs: [[Float]], chunk: Int) {
        if inputs.count == 1 {
            #expect(firstMismatch(outcomes[0].result, inputs[0]) == nil)
            #expect(outcomes[0].counters == ByteCounters())
        } else {
            checkRing(outcomes, inputs: inputs, chunkBytes: chunk)
            #expect(outcomes[0].counters.payloadBytesSent == 3 * 4 * 727_626)  // 2(N−1)/N × 4 × count per round
        }
    }

    @Test("star: hub (rank 0) and 3 workers over tcp; messages from several workers are demultiplexed")
    func starTCP() throws {
        let workers = 3, count = 100_003
        let inputs = (0..<workers).map { rankData(rank: $0, count: count, salt: 11) }
        let group = try ZMQTransport.localGroup(worldSize: workers + 1, topology: .star(hub: 0))
        let options = CollectiveOptions(chunkBytes: 32 << 10, timeout: .seconds(60))
        let outcomes = try runRanks(workers + 1) { rank in
            if rank == 0 {
                let hub = StarAllReduceHub(transport: group[0], options: options)
                try hub.reduce(count: count, tag: CollectiveTag(step: 2))
                return RankOutcome(result: [], counters: group[0].counters)
            }
            let worker = StarAllReduceWorker(transport: group[rank], hub: 0, options: options)
            var buffer = inputs[rank - 1]
            try worker.allReduceAverage(&buffer, tag: CollectiveTag(step: 2))
            return RankOutcome(result: buffer, counters: group[rank].counters)
        }.map { try $0.get() }
        let reference = starReference(inputs)
        for w in 1...workers {
            #expect(firstMismatch(outcomes[w].result, reference) == nil, "worker rank \(w)")
            #expect(outcomes[w].counters.payloadBytesSent == 4 * count)
            #expect(outcomes[w].counters.payloadBytesReceived == 4 * count)
        }
        #expect(outcomes[0].counters.payloadBytesReceived == 4 * count * workers)
        #expect(outcomes[0].counters.payloadBytesSent == 4 * count * workers)
    }

    @Test("tree of 5 over tcp: the reference's bits on every rank, exact bytes per role; a non-neighbour's frame is dropped")
    func treeTCP() throws {
        let n = 5, count = 100_003, chunk = 32 << 10
        let inputs = (0..<n).map { rankData(rank: $0, count: count, salt: 12) }
        let group = try ZMQTransport.localGroup(worldSize: n, topology: .tree)
        defer { for t in group { t.close() } }
        // Rank 2 is not rank 1's neighbour (those are 0, 3 and 4): a well-formed tree frame from it is
        // dropped and counted when rank 1 reads it, and the all-reduce goes on undisturbed.
        let context = try ZMQContext()
        let stranger = try ZMQSocket(context: context, type: .dealer)
        defer { stranger.close(); context.terminate() }
        try stranger.setRoutingID(ZMQTransport.routingID(rank: 2))
        try stranger.connect(group[1].boundEndpoint)
        let header = WireHeader(kind: .treeReduce, sender: 2, tag: CollectiveTag(step: 0), offset: 0, count: 1).encoded
        try header.withUnsafeBytes { c in try [UInt8](repeating: 0, count: 4).withUnsafeBytes { try stranger.sendMultipart([c, $0]) } }
        for _ in 0..<1500 where group[1].droppedMessages == 0 {  // until it arrives (rank 1's peers send nothing yet)
            #expect(throws: CommError.self) { try group[1].receive(from: 0, timeout: .milliseconds(20)) { _, _ in } }
        }
        #expect(group[1].droppedMessages == 1)

        let options = CollectiveOptions(chunkBytes: chunk, timeout: .seconds(60))
        let outcomes = try runRanks(n) { rank in
            let tree = TreeAllReduce(transport: group[rank], options: options)
            var buffer = inputs[rank]
            try tree.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            return RankOutcome(result: buffer, counters: group[rank].counters)
        }.map { try $0.get() }
        let reference = treeReference(inputs)
        for r in 0..<n {
            #expect(firstMismatch(outcomes[r].result, reference) == nil, "rank \(r)")
            #expect(outcomes[r].counters.payloadBytesSent == 4 * count * treeEdges[n]![r], "rank \(r)")
            #expect(outcomes[r].counters.payloadBytesReceived == 4 * count * treeEdges[n]![r], "rank \(r)")
        }
        #expect(group.map(\.droppedMessages) == [0, 1, 0, 0, 0])
    }

    @Test("a message with a bad header is rejected with an error naming the sender")
    func badHeader() throws {
        let group = try ZMQTransport.localGroup(worldSize: 2, topology: .ring)
        // Keeps rank 1 (the sender) alive to the end: released early, it would drop its queued message.
        defer { for t in group { t.close() } }
        var bad = WireHeader(kind: .reduceScatter, sender: 1, tag: CollectiveTag(step: 0), offset: 50, count: 50)
        bad.version = 3
        let payload = [UInt8](repeating: 0, count: 200)
        try bad.encoded.withUnsafeBytes { c in
            try payload.withUnsafeBytes { p in try group[1].send(control: c, payload: p, to: 0) }
        }
        let ring = RingAllReduce(transport: group[0], options: CollectiveOptions(timeout: .seconds(30)))
        var buffer = rankData(rank: 0, count: 100)
        do {
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            Issue.record("expected rejection")
        } catch let error as CommError {
            guard case .malformedMessage(let peer, let reason) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(peer == 1)
            #expect(reason.contains("version 3"))
        }
    }

    @Test("messages that are not [control, payload] are dropped and counted; the next good one arrives")
    func extraFrames() throws {
        let transport = try ZMQTransport(rank: 0, worldSize: 2, bind: "tcp://127.0.0.1:*")
        let context = try ZMQContext()
        let rogue = try ZMQSocket(context: context, type: .dealer)
        try rogue.setRoutingID(ZMQTransport.routingID(rank: 1))
        try rogue.connect(transport.boundEndpoint)
        let frame: [UInt8] = [1, 2, 3, 4]
        try frame.withUnsafeBytes { try rogue.sendMultipart([$0, $0, $0]) }
        try frame.withUnsafeBytes { try rogue.sendMultipart([$0]) }
        try frame.withUnsafeBytes { try rogue.sendMultipart([$0, $0]) }
        let got = try transport.receive(from: 1, timeout: .seconds(30)) { c, p in Array(c) + Array(p) }
        #expect(got == frame + frame)
        #expect(transport.droppedMessages == 2)
    }

    @Test("close(flushTimeout:) delivers what is still queued, then refuses further use")
    func closeFlushes() throws {
        // Separate contexts, as in separate processes: closing the sender terminates its
        // context, which must not drop the messages still inside libzmq.
        let receiver = try ZMQTransport(rank: 1, worldSize: 2, bind: "tcp://127.0.0.1:*")
        let sender = try ZMQTransport(rank: 0, worldSize: 2, bind: "tcp://127.0.0.1:*")
        try sender.connect(to: 1, endpoint: receiver.boundEndpoint)
        let data = rankData(rank: 0, count: 25_000)  // 100 KB per message, sent zero-copy
        try data.withUnsafeBytes { bytes in
            for _ in 0..<40 { try sender.send(bytes, to: 1) }
            try sender.completeSends(timeout: .seconds(30))
        }
        sender.close(flushTimeout: .seconds(30))
        #expect(sender.lentSendBuffers == 0)
        for i in 0..<40 {
            let got: [UInt8] = try receiver.receive(from: 0, timeout: .seconds(30))
            #expect(got.count == 100_000, "message \(i)")
        }
        #expect(receiver.counters.payloadBytesReceived == 40 * 100_000)
        #expect(throws: CommError.transportClosed) {
            try data.withUnsafeBytes { try sender.send($0, to: 1) }
        }
    }

    @Test("a receive timeout names the missing peer, and lent buffers are reclaimed")
    func missingPeer() throws {
        // Rank 1 never exists: rank 0 connects to an ipc path nobody binds.
        let transport = try ZMQTransport(rank: 0, worldSize: 2, bind: "tcp://127.0.0.1:*")
        try transport.connect(to: 1, endpoint: uniqueIPCEndpoint("nobody"))
        let ring = RingAllReduce(transport: transport, options: CollectiveOptions(timeout: .milliseconds(100)))
        var buffer = rankData(rank: 0, count: 100_000)  // large enough to be sent zero-copy
        do {
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            Issue.record("expected a timeout")
        } catch let error as CommError {
            guard case .timeout(let peer, _) = error else {
                Issue.record("unexpected \(error)")
                return
            }
            #expect(peer == 1)
            #expect(error.description.contains("from rank 1"))
        }
        #expect(transport.counters.payloadBytesSent == 4 * 50_000)  // segment 0 was queued before the wait
        #expect(transport.lentSendBuffers == 0)  // the error path dropped the queue and got the buffers back
    }
}
