import Testing
@testable import SqueezeCollectives
import SqueezeTestSupport
@testable import SqueezeTransport

/// Chunk size per test count: small chunks for small buffers so segments span many chunks
/// (with a ragged last one); the default for the SqueezeNet-sized buffer.
private func chunkBytes(for count: Int) -> Int { count >= 100_000 ? 256 << 10 : 40 }

/// Runs one all-reduce of `make`'s kind over a fresh in-process group; rank r contributes `inputs[r]`.
private func inProcess(_ inputs: [[Float]], chunkBytes: Int,
                       _ make: @escaping @Sendable (InProcessTransport, CollectiveOptions) -> any AllReducer) throws -> [RankOutcome] {
    let group = InProcessGroup(worldSize: inputs.count)
    let options = CollectiveOptions(chunkBytes: chunkBytes, timeout: .seconds(120))
    return try runRanks(inputs.count) { rank in
        let transport = group[rank]
        var buffer = inputs[rank]
        try make(transport, options).allReduceAverage(&buffer, tag: CollectiveTag(step: 7, bucket: 3))
        return RankOutcome(result: buffer, counters: transport.counters)
    }.map { try $0.get() }
}

private func inProcessRing(_ inputs: [[Float]], chunkBytes: Int) throws -> [RankOutcome] {
    try inProcess(inputs, chunkBytes: chunkBytes) { RingAllReduce(transport: $0, options: $1) }
}

private func inProcessTree(_ inputs: [[Float]], chunkBytes: Int) throws -> [RankOutcome] {
    try inProcess(inputs, chunkBytes: chunkBytes) { TreeAllReduce(transport: $0, options: $1) }
}

/// Runs one star all-reduce: ranks 0..<N are workers, rank N is the hub (`hubWorkers`: the workers it serves).
private func inProcessStar(_ inputs: [[Float]], chunkBytes: Int) throws -> (workers: [RankOutcome], hub: ByteCounters, hubWorkers: [Int]) {
    let n = inputs.count, count = inputs[0].count
    let group = InProcessGroup(worldSize: n + 1)
    let options = CollectiveOptions(chunkBytes: chunkBytes, timeout: .seconds(120))
    let outcomes = try runRanks(n + 1) { rank -> (RankOutcome, [Int]) in
        let transport = group[rank]
        if rank == n {
            let hub = StarAllReduceHub(transport: transport, options: options)
            try hub.reduce(count: count, tag: CollectiveTag(step: 1))
            return (RankOutcome(result: [], counters: transport.counters), hub.workers)
        }
        let worker = StarAllReduceWorker(transport: transport, hub: n, options: options)
        var buffer = inputs[rank]
        try worker.allReduceAverage(&buffer, tag: CollectiveTag(step: 1))
        return (RankOutcome(result: buffer, counters: transport.counters), [])
    }.map { try $0.get() }
    return (outcomes[..<n].map(\.0), outcomes[n].0.counters, outcomes[n].1)
}

/// Elements rank `r` of a ring of `n` sends, message by message, walking the schedule the ring's
/// documentation states (not `ringPayloadBytes`): N segments, the first count mod N one element
/// longer; reduce-scatter step s sends segment r − s (s = 0…N−2); then rank r owns segment r + 1,
/// sends it, and forwards segments r, r − 1, … (N − 2 of them); each segment in messages of at
/// most `chunk` elements.
private func ringMessageSizes(count: Int, worldSize n: Int, rank r: Int, chunk: Int) -> [Int] {
    guard n > 1 else { return [] }
    let size = { (k: Int) in count / n + (((k % n) + n) % n < count % n ? 1 : 0) }
    let segments = (0..<(n - 1)).map { size(r - $0) } + [size(r + 1)] + (0..<(n - 2)).map { size(r - $0) }
    return segments.flatMap { length in stride(from: 0, to: length, by: chunk).map { min(chunk, length - $0) } }
}

@Suite("All-reduce over InProcessTransport")
struct InProcessAllReduceTests {
    @Test("ring: average, identical on every rank, deterministic, exact byte counts",
          arguments: 1...5, [1, 7, 1000, 727_626])
    func ring(worldSize n: Int, count: Int) throws {
        let inputs = (0..<n).map { rankData(rank: $0, count: count) }
        let chunk = chunkBytes(for: count)
        let first = try inProcessRing(inputs, chunkBytes: chunk)
        let second = try inProcessRing(inputs, chunkBytes: chunk)

        let exact = doubleAverage(inputs)
        #expect(maxToleranceViolation(first[0].result, exact: exact, inputs: inputs) <= 1)
        // Bit-identical on every rank, equal to the naive fixed-order reference, and repeatable.
        let reference = ringReference(inputs)
        for r in 0..<n {
            #expect(firstMismatch(first[r].result, first[0].result) == nil, "rank \(r) differs from rank 0")
            #expect(firstMismatch(second[r].result, first[r].result) == nil, "rank \(r) differs between runs")
        }
        #expect(firstMismatch(first[0].result, reference) == nil)

        // Byte counters: every message walked from the schedule, 4 bytes an element, headers counted
        // apart; what rank r sends is what rank r+1 receives; in all, each element crosses N−1 links
        // in each phase. And the library's formulas (`ringPayloadBytes`, `ringMessages`, what the
        // metrics report as theory) agree.
        for r in 0..<n {
            let c = first[r].counters, next = first[(r + 1) % n].counters
            let sizes = ringMessageSizes(count: count, worldSize: n, rank: r, chunk: chunk / 4)
            #expect(c.payloadBytesSent == 4 * sizes.reduce(0, +), "rank \(r) of \(n)")
            #expect(c.messagesSent == sizes.count, "rank \(r) of \(n)")
            #expect(next.payloadBytesReceived == c.payloadBytesSent && next.messagesReceived == c.messagesSent)
            #expect(abs(n * c.payloadBytesSent - 2 * (n - 1) * 4 * count) <= n * 2 * 4)  // 2(N−1)/N × 4 × count, ± 2 elements
            #expect(c.controlBytesSent == WireHeader.size * c.messagesSent)
            #expect(c.controlBytesReceived == WireHeader.size * c.messagesReceived)
            #expect(c.framingBytesSent == 0)
            let theory = ringPayloadBytes(count: count, worldSize: n, rank: r)
            let messages = ringMessages(count: count, worldSize: n, rank: r, chunkBytes: chunk)
            #expect(theory == (c.payloadBytesSent, c.payloadBytesReceived) && messages == (c.messagesSent, c.messagesReceived))
        }
        #expect(first.reduce(0) { $0 + $1.counters.payloadBytesSent } == 2 * (n - 1) * 4 * count)
        if n == 1 {
            #expect(first[0].counters == ByteCounters())
            #expect(firstMismatch(first[0].result, inputs[0]) == nil)
        }
    }

    @Test("ring: the result does not depend on the chunk size")
    func ringChunkSizeIndependent() throws {
        let inputs = (0..<3).map { rankData(rank: $0, count: 10_001, salt: 5) }
        let a = try inProcessRing(inputs, chunkBytes: 4)
        let b = try inProcessRing(inputs, chunkBytes: 1 << 20)
        let c = try inProcessRing(inputs, chunkBytes: 1234)
        #expect(firstMismatch(a[2].result, b[2].result) == nil)
        #expect(firstMismatch(a[1].result, c[1].result) == nil)
        #expect(a[0].counters.payloadBytesSent == b[0].counters.payloadBytesSent)
        #expect(a[0].counters.messagesSent > b[0].counters.messagesSent)
    }

    @Test("star: hub sums in worker order; exact byte counts", arguments: 1...5, [1, 7, 1000, 727_626])
    func star(workers n: Int, count: Int) throws {
        let inputs = (0..<n).map { rankData(rank: $0, count: count, salt: 1) }
        let chunk = chunkBytes(for: count)
        let first = try inProcessStar(inputs, chunkBytes: chunk)
        let second = try inProcessStar(inputs, chunkBytes: chunk)
        #expect(first.hubWorkers == Array(0..<n))

        let exact = doubleAverage(inputs)
        #expect(maxToleranceViolation(first.workers[0].result, exact: exact, inputs: inputs) <= 1)
        let reference = starReference(inputs)
        #expect(firstMismatch(first.workers[0].result, reference) == nil)
        for r in 0..<n {
            #expect(firstMismatch(first.workers[r].result, first.workers[0].result) == nil, "worker \(r) differs")
            #expect(firstMismatch(second.workers[r].result, first.workers[r].result) == nil, "worker \(r) differs between runs")
            let c = first.workers[r].counters
            #expect(c.payloadBytesSent == 4 * count)
            #expect(c.payloadBytesReceived == 4 * count)
            let chunks = (count + chunk / 4 - 1) / (chunk / 4)
            #expect(c.controlBytesSent == WireHeader.size * chunks)
        }
        #expect(first.hub.payloadBytesReceived == 4 * count * n)
        #expect(first.hub.payloadBytesSent == 4 * count * n)
    }

    @Test("tree: the ring's average within tolerance, a fixed order, identical on every rank, exact bytes per role",
          arguments: [1, 2, 3, 4, 5, 7, 8], [1, 7, 1000, 727_626])
    func tree(worldSize n: Int, count: Int) throws {
        let inputs = (0..<n).map { rankData(rank: $0, count: count, salt: 3) }
        let chunk = chunkBytes(for: count)
        let out = try inProcessTree(inputs, chunkBytes: chunk)
        let ring = try inProcessRing(inputs, chunkBytes: chunk)

        // Each within the summation bound of the exact average, so within twice it of each other.
        #expect(maxToleranceViolation(out[0].result, exact: doubleAverage(inputs), inputs: inputs) <= 1)
        #expect(maxToleranceViolation(out[0].result, exact: ring[0].result.map(Double.init), inputs: inputs) <= 2)
        let reference = treeReference(inputs)
        #expect(firstMismatch(out[0].result, reference) == nil)
        for r in 0..<n { #expect(firstMismatch(out[r].result, out[0].result) == nil, "rank \(r) differs from rank 0") }

        // A leaf sends and receives 4 × count, an inner node 4 × count × (1 + children), the root 4 × count × children.
        let chunks = (count + chunk / 4 - 1) / (chunk / 4)
        for r in 0..<n {
            let c = out[r].counters, edges = treeEdges[n]![r]
            let theory = try #require(treePayloadBytes(count: count, worldSize: n, rank: r))
            #expect(theory.sent == 4 * count * edges && theory.received == 4 * count * edges, "rank \(r) of \(n)")
            #expect(c.payloadBytesSent == theory.sent && c.payloadBytesReceived == theory.received, "rank \(r) of \(n)")
            let messages = treeMessages(count: count, worldSize: n, rank: r, chunkBytes: chunk)
            #expect(messages.sent == chunks * edges && messages.received == chunks * edges)
            #expect(c.messagesSent == messages.sent && c.messagesReceived == messages.received, "rank \(r) of \(n)")
            #expect(c.controlBytesSent == WireHeader.size * messages.sent)
        }
        // In all 2(N−1) copies of the range, as many as the ring moves.
        #expect(out.reduce(0) { $0 + $1.counters.payloadBytesSent } == ring.reduce(0) { $0 + $1.counters.payloadBytesSent })
        if n == 1 {
            #expect(out[0].counters == ByteCounters())
            #expect(firstMismatch(out[0].result, inputs[0]) == nil)
        }
    }

    @Test("tree: the result does not depend on the chunk size")
    func treeChunkSizeIndependent() throws {
        let inputs = (0..<5).map { rankData(rank: $0, count: 5000, salt: 4) }
        let a = try inProcessTree(inputs, chunkBytes: 4), b = try inProcessTree(inputs, chunkBytes: 1 << 20)
        #expect(firstMismatch(a[3].result, b[3].result) == nil)
        #expect(a[3].counters.payloadBytesSent == b[3].counters.payloadBytesSent && a[3].counters.messagesSent > b[3].counters.messagesSent)
    }

    @Test("tree: topk is refused, naming the alternatives")
    func treeRefusesTopk() {
        let group = InProcessGroup(worldSize: 2)
        let tree = TreeAllReduce(transport: group[0], compression: .topk(fraction: 0.01))
        var buffer = [Float](repeating: 1, count: 10)
        #expect(throws: UnsupportedCompression(algorithm: .tree, compression: .topk(fraction: 0.01), reason: "sparse partial sums grow on the way up the tree",
                                               alternatives: [.ring, .star], compressionKind: "top-k")) {
            try tree.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
        }
        #expect(group[0].counters == ByteCounters())
    }

    @Test("tree topology: a rank talks to its parent and its children only")
    func treeTopology() {
        #expect(Topology.tree.outboundPeers(rank: 0, worldSize: 1) == [])
        #expect(Topology.tree.outboundPeers(rank: 0, worldSize: 7) == [1, 2])
        #expect(Topology.tree.inboundPeers(rank: 1, worldSize: 7) == [0, 3, 4])
        #expect(Topology.tree.inboundPeers(rank: 1, worldSize: 4) == [0, 3])
        #expect(Topology.tree.inboundPeers(rank: 6, worldSize: 7) == [2])
        for n in 1...8 {
            #expect((0..<n).map { Topology.tree.outboundPeers(rank: $0, worldSize: n).count } == treeEdges[n]!)
        }
    }

    @Test("bucketed use: sub-ranges of one buffer, other elements untouched", arguments: ["ring", "tree"])
    func buckets(algorithm: String) throws {
        let n = algorithm == "tree" ? 5 : 3, count = 5000
        let inputs = (0..<n).map { rankData(rank: $0, count: count, salt: 2) }
        let buckets = [0..<1200, 1200..<1201, 3000..<4999]
        let group = InProcessGroup(worldSize: n)
        let results = try runRanks(n) { rank in
            let options = CollectiveOptions(chunkBytes: 256)
            let reducer: any AllReducer = algorithm == "tree" ? TreeAllReduce(transport: group[rank], options: options)
                                                              : RingAllReduce(transport: group[rank], options: options)
            var buffer = inputs[rank]
            try buffer.withUnsafeMutableBufferPointer { b in
                for (i, range) in buckets.enumerated() {
                    try reducer.allReduceAverage(b, range: range, tag: CollectiveTag(step: 1, bucket: UInt32(i)))
                }
            }
            return buffer
        }.map { try $0.get() }
        for range in buckets {
            let slices = inputs.map { Array($0[range]) }
            let reference = algorithm == "tree" ? treeReference(slices) : ringReference(slices)
            for r in 0..<n { #expect(firstMismatch(Array(results[r][range]), reference) == nil) }
        }
        for r in 0..<n {
            for i in [1201, 2000, 2999, 4999] { #expect(results[r][i].bitPattern == inputs[r][i].bitPattern) }
        }
    }

    @Test("mismatched bucket ids are rejected, naming the peer")
    func bucketMismatch() throws {
        let group = InProcessGroup(worldSize: 2)
        let outcomes = runRanks(2) { rank in
            let ring = RingAllReduce(transport: group[rank], options: CollectiveOptions(timeout: .seconds(5)))
            var buffer = rankData(rank: rank, count: 100)
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 4, bucket: UInt32(rank)))
        }
        for (rank, outcome) in outcomes.enumerated() {
            guard case .failure(let error as CommError) = outcome,
                  case .malformedMessage(let peer, let reason) = error
            else {
                Issue.record("rank \(rank): expected a malformed-message error, got \(outcome)")
                continue
            }
            #expect(peer == 1 - rank)
            #expect(reason.contains("tag"))
            #expect(error.description.contains("rank \(1 - rank)"))
        }
    }
}

@Suite("Rejected messages over InProcessTransport")
struct InProcessRejectionTests {
    /// Rank 1 injects `control` + `payload`; rank 0 then runs a 2-rank ring and must fail.
    private func ringError(control: [UInt8], payload: [UInt8]) -> CommError? {
        let group = InProcessGroup(worldSize: 2)
        do {
            try control.withUnsafeBytes { c in
                try payload.withUnsafeBytes { p in try group[1].send(control: c, payload: p, to: 0) }
            }
            let ring = RingAllReduce(transport: group[0], options: CollectiveOptions(timeout: .seconds(5)))
            var buffer = [Float](repeating: 1, count: 10)
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            return nil
        } catch {
            return error as? CommError
        }
    }

    /// The first message rank 0 expects from rank 1 in a 2-rank ring of 10 Floats.
    private var goodHeader: WireHeader {
        WireHeader(kind: .reduceScatter, sender: 1, phaseStep: 0, tag: CollectiveTag(step: 0), offset: 5, count: 5)
    }
    private var goodPayload: [UInt8] { [UInt8](repeating: 0, count: 20) }

    @Test("wrong protocol version")
    func wrongVersion() {
        var h = goodHeader
        h.version = 9
        let error = ringError(control: h.encoded, payload: goodPayload)
        #expect(error?.peer == 1)
        #expect(error?.description.contains("version 9") == true)
    }

    @Test("unknown message kind")
    func unknownKind() {
        var bytes = goodHeader.encoded
        bytes[3] = 77
        let error = ringError(control: bytes, payload: goodPayload)
        #expect(error?.peer == 1)
        #expect(error?.description.contains("unknown message kind 77") == true)
    }

    @Test("truncated header")
    func truncated() {
        let error = ringError(control: Array(goodHeader.encoded[..<20]), payload: goodPayload)
        #expect(error?.peer == 1)
        #expect(error?.description.contains("truncated") == true)
    }

    @Test("payload length disagrees with the header")
    func wrongPayloadLength() {
        let error = ringError(control: goodHeader.encoded, payload: [UInt8](repeating: 0, count: 19))
        #expect(error?.peer == 1)
        #expect(error?.description.contains("19 bytes") == true)
    }

    @Test("header announces a range the receiver does not expect")
    func wrongRange() {
        var h = goodHeader
        h.count = 4
        let error = ringError(control: h.encoded, payload: [UInt8](repeating: 0, count: 16))
        #expect(error?.peer == 1)
        #expect(error?.description.contains("range") == true)
    }

    @Test("a correct message is accepted (control for the cases above)")
    func goodMessageAccepted() {
        // With a valid first message rank 0 proceeds and then waits for the all-gather
        // message, which never comes: so the error is a timeout, not a rejection.
        let group = InProcessGroup(worldSize: 2)
        let error: CommError? = {
            do {
                try goodHeader.encoded.withUnsafeBytes { c in
                    try goodPayload.withUnsafeBytes { p in try group[1].send(control: c, payload: p, to: 0) }
                }
                let ring = RingAllReduce(transport: group[0], options: CollectiveOptions(timeout: .milliseconds(50)))
                var buffer = [Float](repeating: 1, count: 10)
                try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
                return nil
            } catch { return error as? CommError }
        }()
        guard case .timeout(let peer, _) = error else {
            Issue.record("expected a timeout, got \(String(describing: error))")
            return
        }
        #expect(peer == 1)
    }

    /// Rank `sender` of a tree of 4 injects `header` (+ a payload of its size) to rank 1, which runs the
    /// tree all-reduce of 10 Floats and must fail naming the sender. Rank 1's neighbours are 0 and 3.
    private func treeError(from sender: Int, _ header: WireHeader) -> CommError? {
        let group = InProcessGroup(worldSize: 4)
        do {
            let payload = [UInt8](repeating: 0, count: 4 * Int(header.count))
            try header.encoded.withUnsafeBytes { c in
                try payload.withUnsafeBytes { p in try group[sender].send(control: c, payload: p, to: 1) }
            }
            let tree = TreeAllReduce(transport: group[1], options: CollectiveOptions(timeout: .milliseconds(200)))
            var buffer = [Float](repeating: 1, count: 10)
            try tree.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            return nil
        } catch {
            return error as? CommError
        }
    }

    @Test("tree: a child's frame of the wrong kind, range or sender is rejected naming the child; a non-neighbour is never read")
    func treeRejections() {
        let good = WireHeader(kind: .treeReduce, sender: 3, tag: CollectiveTag(step: 0), offset: 0, count: 10)
        var kind = good; kind.kind = .treeBroadcast
        var range = good; range.offset = 2; range.count = 8
        var sender = good; sender.sender = 2
        for (header, words) in [(kind, "kind treeBroadcast"), (range, "range 2+8"), (sender, "names sender 2")] {
            let error = treeError(from: 3, header)
            #expect(error?.peer == 3, "\(words): \(String(describing: error))")
            #expect(error?.description.contains(words) == true, "\(String(describing: error))")
        }
        // The good message passes; rank 1 then waits for its parent's average: a timeout naming rank 0.
        #expect(treeError(from: 3, good) == .timeout(peer: 0, waited: .milliseconds(200)))
        // Rank 2 is not rank 1's neighbour: its frame, however well formed, is not what rank 1 waits
        // for, so it waits for its child 3 (over ZeroMQ such a frame is dropped: ZMQTests).
        var stranger = good; stranger.sender = 2
        #expect(treeError(from: 2, stranger) == .timeout(peer: 3, waited: .milliseconds(200)))
    }

    @Test("receive timeout names the silent peer")
    func timeoutNamesPeer() {
        let group = InProcessGroup(worldSize: 3)
        let ring = RingAllReduce(transport: group[1], options: CollectiveOptions(timeout: .milliseconds(20)))
        var buffer = [Float](repeating: 1, count: 30)
        do {
            try ring.allReduceAverage(&buffer, tag: CollectiveTag(step: 0))
            Issue.record("expected a timeout")
        } catch let error as CommError {
            #expect(error.peer == 0)  // rank 1 receives from its left neighbour, rank 0
            #expect(error.description.contains("rank 0"))
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    @Test("invalid peers are refused")
    func invalidPeer() {
        let group = InProcessGroup(worldSize: 2)
        let bytes = [UInt8](repeating: 0, count: 4)
        #expect(throws: CommError.invalidPeer(2, worldSize: 2)) {
            try bytes.withUnsafeBytes { try group[0].send($0, to: 2) }
        }
        #expect(throws: CommError.invalidPeer(0, worldSize: 2)) {
            try bytes.withUnsafeBytes { try group[0].send($0, to: 0) }
        }
    }
}
