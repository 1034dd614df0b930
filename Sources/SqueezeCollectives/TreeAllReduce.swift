// Tree all-reduce: partial sums up a binary tree rooted at rank 0, the average back down.

import SqueezeSystem
import SqueezeTransport

/// Tree all-reduce (FireCaffe's reduction tree): partial sums go up a binary tree rooted at rank 0
/// (rank r's parent is (r−1)/2, its children 2r+1 and 2r+2), the root divides by N once and the
/// average comes back down.
///
/// Chunk by chunk (`options.chunkBytes`), a rank adds its children's partial sums onto its own values
/// (own + child 2r+1 + child 2r+2, in that order, straight from the receive buffer for Float32) and
/// sends the sum to its parent at once, so a chunk climbs while the next is still arriving below.
/// The root divides each finished chunk by N and sends it to its children, which take it over and
/// pass the same bytes on, so every rank ends bit-identical and the order of the sums is fixed.
/// Per call a rank sends and receives 4 × count payload bytes per tree edge it has (a leaf 4n each
/// way, an inner node with c children 4n(1 + c), the root 4nc): see `treePayloadBytes`. In all 2(N−1)
/// × 4n, as much as the ring, but the inner nodes carry three times a leaf's share.
///
/// Compression (the same on every rank): fp16, bf16 and int8 chunks are encoded on every edge. A rank
/// decodes its children's partial sums, adds them to its own values in Float32 and encodes the sum for
/// its parent; the root encodes the average once and keeps its decoded form, which the others pass on
/// unchanged. With int8 a rank's own values enter the sum as deq(q(g + residual)) per chunk and the
/// rest stays in its residual (error feedback, as in the ring); the partial sums re-encoded on the way
/// up get none: that error belongs to no single rank. A value crosses at most ⌊log₂ N⌋ re-encodings
/// of partial sums on its way to the root (the ring: N − 2), plus the average's one encoding.
/// topk is refused (`UnsupportedCompression`): a sparse partial sum grows with every merge, so
/// the tree would move no fewer bytes than a gather; use the ring or the star.
public final class TreeAllReduce<T: Transport>: PeerCollective<T>, AllReducer {
    public func allReduceAverage(_ buffer: UnsafeMutableBufferPointer<Float>, range: Range<Int>, tag: CollectiveTag) throws {
        try checkCollectiveRange(range, bufferCount: buffer.count)
        if let refusal = AllReduceAlgorithm.tree.unsupported(compression) { throw refusal }
        guard transport.worldSize > 1, !range.isEmpty else { return }
        let p = buffer.baseAddress! + range.lowerBound
        try transport.collective(timeout: options.timeout) {
            if let codec = DenseCodec(compression) {
                let feedback = compression == .int8 ? residual.base(forBufferOf: buffer.count) + range.lowerBound : nil
                try reduce(codec, p, count: range.count, base: range.lowerBound, residual: feedback, tag: tag)
            } else {
                try reduce(Float32Codec(), p, count: range.count, base: range.lowerBound, residual: nil, tag: tag)
            }
        }
    }

    /// The tree's schedule for p[0..<count] (elements base..<base+count of the caller's buffer): up,
    /// then down, chunk by chunk through `codec`. `residual` (int8 only) is the error feedback of p.
    private func reduce<C: ChunkCodec>(_ codec: C, _ p: UnsafeMutablePointer<Float>, count: Int, base: Int,
                                       residual: UnsafeMutablePointer<Float>?, tag: CollectiveTag) throws {
        let r = transport.rank, parent = treeParent(r), children = treeChildren(r, worldSize: transport.worldSize)
        let chunk = options.chunkElements, timeout = options.timeout, divisor = Float(transport.worldSize)
        // Encoded once on the way up; an inner node also keeps a copy of each chunk it passes down.
        let passes = parent != nil && !children.isEmpty ? 2 : 1
        outgoing.reset(capacity: passes * codec.scratchBytes(count: count, chunkBytes: options.chunkBytes))

        func wireHeader(_ kind: WireHeader.Kind, from sender: Int, _ start: Int, _ length: Int) -> WireHeader {
            WireHeader(kind: kind, sender: sender, tag: tag, offset: base + start, count: length, encoding: codec.encoding)
        }
        func send(_ kind: WireHeader.Kind, _ start: Int, _ length: Int, _ payload: UnsafeRawPointer, to peers: [Int]) throws {
            let control = header.encode(wireHeader(kind, from: r, start, length)), bytes = codec.payloadBytes(count: length)
            for peer in peers {
                try traced(tracer, .allReduce, "send", "send", ["to": peer, "bytes": bytes]) {
                    try transport.send(control: control, payload: UnsafeRawBufferPointer(start: payload, count: bytes), to: peer)
                }
            }
        }

        // Up: our values plus our children's partial sums, on to the parent; at the root, divided by
        // N and sent down (an encoded average kept in its decoded form, as the others get it).
        try forEachChunk(0..<count, chunk) { off, len in
            guard !children.isEmpty else {  // a leaf
                let out = try codec.encodeOwn(p + off, residual: residual.map { $0 + off }, count: len, scratch: outgoing)
                return try send(.treeReduce, off, len, out, to: [parent!])
            }
            codec.contribute(p + off, residual: residual.map { $0 + off }, count: len, scratch: contribution)
            for (i, child) in children.enumerated() {
                let expected = wireHeader(.treeReduce, from: child, off, len)
                try traced(tracer, .allReduce, "receive", "receive", ["from": child, "bytes": codec.payloadBytes(count: len)]) {
                    try transport.receive(from: child, timeout: timeout) { control, payload in
                        try WireHeader.validate(control: control, payload: payload, from: child, expected: expected)
                        traced(tracer, .allReduce, "reduce", "reduce", ["elements": len]) {
                            codec.accumulate(payload.baseAddress!, into: p + off, count: len, first: false,
                                             divisor: parent == nil && i == children.count - 1 ? divisor : nil)
                        }
                    }
                }
            }
            let out = try codec.encodeSum(p + off, count: len, keepDecoded: parent == nil, scratch: outgoing)
            if let parent {
                try send(.treeReduce, off, len, out, to: [parent])
            } else {
                try send(.treeBroadcast, off, len, out, to: children)
            }
        }

        // Down: take over each chunk of the average and pass its bytes on to our children.
        guard let parent else { return }
        try forEachChunk(0..<count, chunk) { off, len in
            let expected = wireHeader(.treeBroadcast, from: parent, off, len)
            let forward = try traced(tracer, .allReduce, "receive", "receive", ["from": parent, "bytes": codec.payloadBytes(count: len)]) {
                try transport.receive(from: parent, timeout: timeout) { control, payload in
                    try WireHeader.validate(control: control, payload: payload, from: parent, expected: expected)
                    return try codec.assign(payload.baseAddress!, into: p + off, count: len, forwarding: !children.isEmpty, scratch: outgoing)
                }
            }
            if let forward { try send(.treeBroadcast, off, len, forward, to: children) }
        }
    }
}
