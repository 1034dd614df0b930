// Inputs of the data-plane tests: rank-specific Floats and throwaway ipc endpoints.

import Foundation

/// Deterministic, rank-specific test data in [-2, 2) with full mantissas (an LCG), so that
/// sums round differently depending on their order.
public func rankData(rank: Int, count: Int, salt: UInt64 = 0) -> [Float] {
    var state = 0x9E37_79B9_7F4A_7C15 &* UInt64(rank + 1) &+ salt &* 0xD1B5_4A32_D192_ED03
    return (0..<count).map { (_: Int) -> Float in
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        let unit: Double = Double(state >> 40) / Double(1 << 24)
        return Float(unit * 4 - 2)
    }
}

/// A unique ipc:// endpoint in the temp directory.
public func uniqueIPCEndpoint(_ name: String) -> String {
    "ipc://\(NSTemporaryDirectory())squeezecomm-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max))"
}
