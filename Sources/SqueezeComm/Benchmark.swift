// Timing helpers for benchmarks (never used for assertions in tests).

public enum CommBenchmark {
    /// Runs `body(i)` for `warmup` untimed then `iterations` timed rounds and returns the
    /// median duration of the timed rounds in seconds.
    public static func medianSeconds(iterations: Int, warmup: Int = 3, _ body: (Int) throws -> Void) throws -> Double {
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
        times.sort()
        return times.count % 2 == 1
            ? times[times.count / 2]
            : (times[times.count / 2 - 1] + times[times.count / 2]) / 2
    }

    /// Runs `iterations` all-reduces of `floats` Floats (after `warmup` untimed ones) with
    /// `reducer` and returns the median seconds per all-reduce as seen by this rank.
    /// Every participant of the group must call it with the same arguments at the same time
    /// (a star hub calls `hubMedianSeconds`).
    public static func allReduceMedianSeconds(_ reducer: some AllReducer, floats: Int, iterations: Int,
                                              warmup: Int = 3) throws -> Double {
        var buffer = [Float](repeating: 0, count: floats)
        for i in 0..<floats { buffer[i] = Float(i % 1000) * 0.001 }
        return try buffer.withUnsafeMutableBufferPointer { b in
            try medianSeconds(iterations: iterations, warmup: warmup) { i in
                try reducer.allReduceAverage(b, tag: CollectiveTag(step: UInt32(i)))
            }
        }
    }

    /// The hub's side of `allReduceMedianSeconds` for a star.
    public static func hubMedianSeconds<T: Transport>(_ hub: StarAllReduceHub<T>, floats: Int, iterations: Int,
                                                      warmup: Int = 3) throws -> Double {
        try medianSeconds(iterations: iterations, warmup: warmup) { i in
            try hub.reduce(count: floats, tag: CollectiveTag(step: UInt32(i)))
        }
    }
}
