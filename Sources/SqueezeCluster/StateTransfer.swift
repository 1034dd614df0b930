// The training state sent to the ranks of a new membership epoch that lack it (issue 29): joiners,
// and survivors one step behind. Over that epoch's data plane (sealed like every data-plane frame on
// tcp), along its topology's edges, before its first step.

import Foundation
import SqueezeTransport
import SqueezeTraining

/// Which ranks of a membership epoch receive the training state of `step` before it trains, and the
/// checksum of parameters and momentum (`stateChecksum`) that every rank holding it reported.
struct StateTransfer: Sendable {
    let receivers: Set<Int>
    let checksum: String
    let step: Int

    /// Where each receiver gets the state from: a breadth-first walk from the ranks that hold it along
    /// the topology's edges (a ring: from rank r − 1; a tree: from its parent or a child), so that a
    /// source holds the state, or has received it, before it sends. nil when a receiver is out of reach.
    static func sources(topology: Topology, worldSize: Int, receivers: Set<Int>) -> [Int: Int]? {
        var source = [Int: Int](), queue = (0..<worldSize).filter { !receivers.contains($0) }, next = 0
        while next < queue.count {
            let rank = queue[next]
            next += 1
            for peer in topology.outboundPeers(rank: rank, worldSize: worldSize) where receivers.contains(peer) && source[peer] == nil {
                source[peer] = rank
                queue.append(peer)
            }
        }
        return source.count == receivers.count ? source : nil
    }

    /// Rank `rank`'s part: a receiver takes the state from its source, puts it into `trainer` and checks
    /// it against `checksum`; then every rank sends it on to the receivers it is the source of, in
    /// messages of at most `chunkBytes`. Returns the bytes received (0 for a holder).
    /// `topology` spans the `workers` ranks (a star's state goes around the workers' ring beside it: `.ring`).
    func run(rank: Int, topology: Topology, workers: Int, transport: any DataPlaneTransport, trainer: Trainer,
             chunkBytes: Int, timeout: Duration) throws -> Int {
        guard let sources = Self.sources(topology: topology, worldSize: workers, receivers: receivers) else {
            throw ClusterError("rank \(rank): no rank holding the training state reaches ranks \(receivers.sorted()) over the \(topology) topology")
        }
        var bytes = [UInt8]()
        if let source = sources[rank] {
            bytes = try receive(from: source, transport: transport, timeout: timeout)
            let state = try TrainingState(decoding: bytes, from: "rank \(source)", expected: nil)
            try state.restore(into: trainer)
            let mine = stateChecksum(trainer)
            guard mine == checksum else {
                throw ClusterError("rank \(rank): the training state from rank \(source) has checksum \(mine), not \(checksum), "
                                   + "the one every rank holding it reported")
            }
        }
        let received = bytes.count  // a receiver may also be the source of another receiver
        let targets = sources.filter { $0.value == rank }.map(\.key).sorted()
        guard !targets.isEmpty else { return received }
        if bytes.isEmpty { bytes = try TrainingState(trainer: trainer, worldSize: workers).encoded() }
        try bytes.withUnsafeBytes { all in
            var headers = [[UInt8]]()  // kept until the sends complete (the transport may not copy)
            for target in targets {
                for offset in stride(from: 0, to: all.count, by: chunkBytes) {
                    headers.append(StateHeader(step: step, total: all.count, offset: offset).encoded)
                    let chunk = UnsafeRawBufferPointer(rebasing: all[offset..<min(offset + chunkBytes, all.count)])
                    try headers[headers.count - 1].withUnsafeBytes { try transport.send(control: $0, payload: chunk, to: target) }
                }
            }
            try transport.completeSends(timeout: timeout)
        }
        return received
    }

    /// The state's bytes from `source`, chunk by chunk, each header checked against the one expected next.
    private func receive(from source: Int, transport: any DataPlaneTransport, timeout: Duration) throws -> [UInt8] {
        var bytes = [UInt8](), total = 0
        repeat {
            try transport.receive(from: source, timeout: timeout) { control, payload in
                let header = try StateHeader(decoding: control, from: source)
                let expected = "the state of step \(step) from offset \(bytes.count)" + (bytes.isEmpty ? "" : " of \(total) bytes")
                guard header.step == step, header.offset == bytes.count, bytes.isEmpty || header.total == total,
                      header.total <= StateHeader.maxBytes, header.offset + payload.count <= header.total, !payload.isEmpty else {
                    throw CommError.malformedMessage(peer: source, reason: "a state chunk of \(payload.count) bytes for step \(header.step), "
                                                     + "offset \(header.offset) of \(header.total); expected \(expected)")
                }
                total = header.total
                bytes.append(contentsOf: payload)
            }
        } while bytes.count < total
        return bytes
    }
}

/// The control part of a state chunk: "SQZS", then the step, the state's size and the chunk's offset
/// (little-endian UInt64 each).
struct StateHeader: Equatable {
    static let magic = Array("SQZS".utf8)
    static let size = 28
    /// A bound on a state's size (SqueezeNet's is about 6 MB): a header above it is refused before any allocation.
    static let maxBytes = 1 << 30
    var step: Int, total: Int, offset: Int

    var encoded: [UInt8] {
        var out = Self.magic
        for v in [step, total, offset] { withUnsafeBytes(of: UInt64(v).littleEndian) { out += $0 } }
        return out
    }

    init(step: Int, total: Int, offset: Int) { self.step = step; self.total = total; self.offset = offset }

    init(decoding control: UnsafeRawBufferPointer, from peer: Int) throws {
        guard control.count == Self.size, Array(control[0..<4]) == Self.magic else {
            throw CommError.malformedMessage(peer: peer, reason: "a message of \(control.count) control bytes where a training-state chunk was expected")
        }
        func field(_ i: Int) -> Int { Int(truncatingIfNeeded: control.loadUnaligned(fromByteOffset: 4 + 8 * i, as: UInt64.self).littleEndian) }
        (step, total, offset) = (field(0), field(1), field(2))
    }
}
