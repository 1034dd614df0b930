// Timing helpers for benchmarks (never used for assertions in tests).

import SqueezeTransport

public enum CommBenchmark {
    /// Runs `body(i)` for `warmup` untimed then `iterations` timed rounds and returns the
    /// duration of each timed round in seconds.
    public static func seconds(iterations: Int, warmup: Int = 3, _ body: (Int) throws -> Void) throws -> [Double] {
        precondition(iterations >= 1)
        for i in 0..<warmup { try body(i) }
        let clock = ContinuousClock()
        var times: [Double] = []
        times.reserveCapacity(iterations)
        for i in 0..<iterations {
            let t = try clock.measure { try body(warmup + i) }
            let (s, atto) = t.components
            times.append(Double(s) + Double(atto) * 1e-18)
        }
        return times
    }

    public static func median(_ values: [Double]) -> Double {
        precondition(!values.isEmpty)
        let v = values.sorted()
        return v.count % 2 == 1 ? v[v.count / 2] : (v[v.count / 2 - 1] + v[v.count / 2]) / 2
    }

    /// Seconds per all-reduce of `floats` Floats with `reducer`, one entry per timed
    /// iteration (after `warmup` untimed ones), as seen by this rank. Every participant
    /// of the group must call it with the same arguments at the same time (a star hub
    /// calls `hubSeconds`).
    public static func allReduceSeconds(_ reducer: some AllReducer, floats: Int, iterations: Int,
                                        warmup: Int = 3) throws -> [Double] {
        var buffer = [Float](repeating: 0, count: floats)
        for i in 0..<floats { buffer[i] = Float(i % 1000) * 0.001 }
        return try buffer.withUnsafeMutableBufferPointer { b in
            try seconds(iterations: iterations, warmup: warmup) { i in
                try reducer.allReduceAverage(b, tag: CollectiveTag(step: UInt32(truncatingIfNeeded: i)))
            }
        }
    }

    /// The hub's side of `allReduceSeconds` for a star.
    public static func hubSeconds<T: Transport>(_ hub: StarAllReduceHub<T>, floats: Int, iterations: Int,
                                                warmup: Int = 3) throws -> [Double] {
        try seconds(iterations: iterations, warmup: warmup) { i in
            try hub.reduce(count: floats, tag: CollectiveTag(step: UInt32(truncatingIfNeeded: i)))
        }
    }
}
