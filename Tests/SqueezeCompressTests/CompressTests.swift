import Foundation
import Testing
import SqueezeEngine
@testable import SqueezeCompress

/// A deterministic generator for test data.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite struct HuffmanTests {
    @Test func roundTripsRandomAndSkewedStreams() throws {
        var rng = SplitMix(state: 7)
        for alphabet in [1, 2, 16, 256] {
            for skew in [0.0, 0.9, 0.999] {
                let n = 5000
                let symbols = (0..<n).map { _ -> Int in
                    Double.random(in: 0..<1, using: &rng) < skew ? 0 : Int.random(in: 0..<alphabet, using: &rng)
                }
                var freq = [Int](repeating: 0, count: alphabet)
                for s in symbols { freq[s] += 1 }
                let code = HuffmanCode(frequencies: freq)
                let bytes = code.encode(symbols)
                #expect(try code.decode(bytes, count: n) == symbols, "alphabet \(alphabet), skew \(skew)")
                #expect(bytes.count == (code.bitCount(of: symbols) + 7) / 8)
                // The code read back from its lengths alone decodes the same.
                #expect(try HuffmanCode(lengths: code.lengths).decode(bytes, count: n) == symbols)
                // Huffman never needs more than the fixed-width code (ceil(log2 alphabet) bits, 1 at least).
                let fixed = max(1, Int(ceil(log2(Double(alphabet)))))
                #expect(code.bitCount(of: symbols) <= fixed * n)
            }
        }
        // A very skewed stream costs close to its entropy: ~1 bit per symbol at most here.
        let skewed = [Int](repeating: 3, count: 10_000) + [0, 1, 2]
        let code = HuffmanCode(frequencies: [1, 1, 1, 10_000])
        #expect(code.bitCount(of: skewed) < 10_100)
        // Fibonacci frequencies would give a 30-bit code: the length limit holds.
        var fib = [1, 1]
        while fib.count < 40 { fib.append(fib[fib.count - 1] + fib[fib.count - 2]) }
        let limited = HuffmanCode(frequencies: fib)
        #expect(Int(limited.lengths.max()!) <= HuffmanCode.maxLength)
        let stream = Array(0..<40)
        #expect(try limited.decode(limited.encode(stream), count: 40) == stream)
        // An empty stream.
        let empty = HuffmanCode(frequencies: [0, 0])
        #expect(try empty.decode(empty.encode([Int]()), count: 0) == [])
    }

    @Test func corruptTablesAndStreamsAreErrors() throws {
        #expect(throws: HuffmanError.self) { try HuffmanCode(lengths: [1, 1, 1]) }  // over-subscribed
        #expect(throws: HuffmanError.self) { try HuffmanCode(lengths: [21, 1]) }
        let code = HuffmanCode(frequencies: [5, 3, 1, 1])
        let bytes = code.encode([0, 1, 2, 3, 0, 0])
        #expect(throws: HuffmanError.self) { try code.decode(bytes, count: 60) }            // runs out
        #expect(throws: HuffmanError.self) { try code.decode(bytes + [0], count: 6) }       // trailing byte
        #expect(throws: HuffmanError.self) { try code.decode([0xFF, 0xFF, 0xFF], count: 30) }
        // An incomplete code: the pattern with no symbol is an error, not a guess.
        let incomplete = try HuffmanCode(lengths: [1, 2, 0])  // codes 0 and 10; 11 is none
        #expect(throws: HuffmanError.self) { try incomplete.decode([0b1100_0000], count: 1) }
    }
}

@Suite struct CompressedModelTests {
    /// A small model with every tensor pruned and shared as `compress` does it.
    func compressed(bits: Int, density: Double = 0.4, seed: UInt64 = 1) -> (CompressedModel, Network) {
        var config = ModelConfig()
        config.batchNorm = true
        config.fire.baseE = 16; config.fire.incrE = 16
        let net = Network(config: config, seed: seed)
        var tensors = [CompressedTensor]()
        for (store, specs) in [(net.parameters, net.parameters.specs), (net.buffers, net.buffers.specs)] {
            for spec in specs {
                let values = Array(UnsafeBufferPointer(start: store.values.pointer + spec.offset, count: spec.count))
                if spec.shape.count == 4 {
                    let sharing = WeightSharing(weights: values, mask: magnitudeMask(values, density: density), bits: bits)
                    tensors.append(CompressedTensor(name: spec.name, shape: spec.shape, storage: .shared(sharing.shared())))
                    (store.values.pointer + spec.offset).update(from: sharing.values, count: spec.count)
                } else {
                    tensors.append(CompressedTensor(name: spec.name, shape: spec.shape, storage: .plain(values)))
                }
            }
        }
        return (CompressedModel(config: config, tensors: tensors), net)
    }

    @Test(arguments: [8, 6, 4]) func roundTripGivesExactlyTheSharedValuesAndZeros(bits: Int) throws {
        let (model, net) = compressed(bits: bits)
        let bytes = try model.encoded()
        let decoded = try CompressedModel.decode(bytes, file: "m.sqz")
        #expect(decoded == model)
        for t in decoded.tensors {
            guard case .shared(let s) = t.storage else { continue }
            #expect(s.codebook.count <= 1 << bits && s.codebook[0] == 0)
            let dense = t.dense()
            let expected = Array(UnsafeBufferPointer(start: net.parameters.value(t.name), count: t.count))
            #expect(dense == expected, "\(t.name)")
            let kept = dense.filter { $0 != 0 }.count
            #expect(kept == Int((Double(t.count) * 0.4).rounded()) && s.keptCount == kept, "\(t.name)")  // the density asked for
        }
        // The decoded model's logits equal those of the dense weights it encodes.
        let other = Network(config: decoded.config, seed: 99)
        try decoded.load(into: other)
        var rng = SplitMix(state: 3)
        let x = FloatBuffer(count: 3 * 4 * 32 * 32)
        for i in 0..<(3 * 4 * 32 * 32) { x.pointer[i] = Float.random(in: -1...1, using: &rng) }
        let input = Tensor(data: x.pointer, shape: Shape(c: 3, n: 4, h: 32, w: 32))
        #expect(net.predict(input) == other.predict(input))
        // Smaller than the float32 parameters, even for this tiny model whose codebooks weigh most.
        #expect(bytes.count < 4 * net.parameters.count)
    }

    /// The encoded size, worked out here from the format's parts (docs/compressed-format.md): the header
    /// and the config's JSON; per tensor its name, shape and storage byte; float32 values for a plain
    /// tensor; for a shared one the codebook, both Huffman tables, and each stream as ⌈bits / 8⌉ bytes,
    /// its bits those of an optimal prefix code for the symbols (every optimal code has the same total),
    /// the entries read off the dense quantized weights; then the CRC.
    @Test(arguments: [8, 4]) func fileSizeIsTheSumOfItsParts(bits: Int) throws {
        let (model, net) = compressed(bits: bits)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        var expected = 4 + 2 + 2 + 4 + (try encoder.encode(model.config)).count + 4 + 4  // magic … tensor count, CRC
        var shared = 0
        for t in model.tensors {
            expected += 2 + t.name.utf8.count + 1 + 4 * t.shape.count + 1
            guard case .shared(let s) = t.storage else {
                expected += 4 * t.count
                continue
            }
            shared += 1
            let dense = Array(UnsafeBufferPointer(start: net.parameters.value(t.name), count: t.count))
            var codes = [Int](), gaps = [Int](), last = -1
            let longest = (1 << s.indexBits) - 1
            for (position, value) in dense.enumerated() where value != 0 {
                while position - last - 1 > longest { codes.append(0); gaps.append(longest); last += longest + 1 }  // a filler
                codes.append(try #require(s.codebook.firstIndex(of: value)))
                gaps.append(position - last - 1)
                last = position
            }
            let k = s.codebook.count
            expected += 1 + 2 + 4 * k + 1 + 4 + k + (1 << s.indexBits)       // bits … entries, code and index tables
            expected += 4 + (optimalCodeBits(codes) + 7) / 8 + 4 + (optimalCodeBits(gaps) + 7) / 8
        }
        #expect(shared == 26)  // every convolution's weight of the 10-layer model
        #expect(try model.encoded().count == expected)
    }

    /// Bits of `symbols` under an optimal prefix code (Huffman's merges; one distinct symbol takes a bit each).
    func optimalCodeBits(_ symbols: [Int]) -> Int {
        var weights = Dictionary(symbols.map { ($0, 1) }, uniquingKeysWith: +).values.sorted()
        if weights.count == 1 { return weights[0] }
        var bits = 0
        while weights.count > 1 {
            let merged = weights.removeFirst() + weights.removeFirst()
            bits += merged
            weights.insert(merged, at: weights.firstIndex { $0 >= merged } ?? weights.count)
        }
        return bits
    }

    @Test func longGapsAreBridgedByFillerEntries() throws {
        var assignment = [Int](repeating: 0, count: 100)
        assignment[0] = 1; assignment[40] = 2; assignment[99] = 1
        let s = SharedWeights(assignment: assignment, codebook: [0, -0.5, 0.25], bits: 2, indexBits: 4)
        #expect(s.keptCount == 3)
        #expect(s.codes.count > 3 && s.gaps.allSatisfy { $0 < 16 })
        #expect(s.dense(count: 100) == assignment.map { [0, -0.5, 0.25][$0] })
        #expect(s.problem(count: 100) == nil)
        #expect(s.problem(count: 99) != nil)
    }

    @Test func everyMalformedFileIsAnErrorNamingTheFileAndTheProblem() throws {
        let (model, _) = compressed(bits: 6)
        let good = try model.encoded()
        func problem(_ bytes: [UInt8]) -> String? {
            do { _ = try CompressedModel.decode(bytes, file: "bad.sqz"); return nil } catch let e as CompressedFormatError {
                #expect(e.description.hasPrefix("bad.sqz: "))
                return e.reason
            } catch { return "unexpected error type: \(error)" }
        }
        #expect(problem(good) == nil)
        #expect(problem([])?.contains("truncated") == true)
        #expect(problem(Array(good.prefix(good.count / 2)))?.contains("checksum") == true)
        var magic = good; magic[0] = UInt8(ascii: "X")
        #expect(problem(magic)?.contains("magic") == true)
        var version = good; version[4] = 9
        #expect(problem(version)?.contains("version 9") == true)
        // A flipped bit anywhere is caught by the checksum.
        var rng = SplitMix(state: 11)
        for _ in 0..<50 {
            var flipped = good
            let i = Int.random(in: 8..<good.count, using: &rng)
            flipped[i] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng))
            #expect(problem(flipped) != nil)
        }
        // Structural damage with a valid checksum (a writer bug or a forged file): still named.
        func resealed(_ body: (inout [UInt8]) -> Void) -> [UInt8] {
            var b = Array(good.dropLast(4))
            body(&b)
            let crc = crc32(b)
            return b + (0..<4).map { UInt8(truncatingIfNeeded: crc >> (8 * $0)) }
        }
        #expect(problem(resealed { $0.removeLast(10) }) != nil)
        #expect(problem(resealed { $0 += [1, 2, 3] })?.contains("unexpected bytes") == true)
        #expect(problem(resealed { $0[8] = 0xFF; $0[9] = 0xFF; $0[10] = 0xFF; $0[11] = 0x7F })?.contains("truncated") == true)
        // Every prefix is refused, never a crash.
        for cut in stride(from: 0, to: good.count, by: max(1, good.count / 97)) {
            #expect(problem(resealed { $0.removeLast(max(0, good.count - 4 - cut)) }) != nil)
        }
    }

    @Test func pruningMasksAndWeightSharing() {
        let w: [Float] = [0.1, -3, 0.5, 2, -0.05, 0, 1, -1]
        #expect(magnitudeMask(w, density: 0.5) == [0, 1, 0, 1, 0, 0, 1, 1])
        #expect(magnitudeMask(w, density: 1) == [Float](repeating: 1, count: 8))
        let sharing = WeightSharing(weights: w, mask: magnitudeMask(w, density: 0.5), bits: 2)
        #expect(sharing.codebook.count <= 4 && sharing.codebook[0] == 0)
        #expect(zip(sharing.assignment, magnitudeMask(w, density: 0.5)).allSatisfy { ($0 == 0) == ($1 == 0) })
        // With as many shared values as distinct kept weights, sharing is exact.
        let exact = WeightSharing(weights: w, mask: magnitudeMask(w, density: 0.5), bits: 3)
        #expect(exact.values == zip(w, magnitudeMask(w, density: 0.5)).map { $0 * $1 })
        // The centroid update sums the gradients of each cluster; pruned weights stay zero.
        var tuned = exact
        tuned.step(gradients: [Float](repeating: 1, count: 8), rate: 0.1)
        #expect(zip(tuned.values, exact.values).allSatisfy { $1 == 0 ? $0 == 0 : abs($0 - ($1 - 0.1)) < 1e-6 })
    }
}
