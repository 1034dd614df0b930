// Element-wise Float loops used by the reductions: plain loops over unsafe pointers,
// which the optimiser vectorises. Sources are raw pointers into received messages,
// which need not be 4-byte aligned (ZeroMQ may place a small frame anywhere inside its
// receive batch); an aligned source takes a typed fast path.

enum FloatKernels {
    @inline(__always)
    private static func isAligned(_ p: UnsafeRawPointer) -> Bool {
        Int(bitPattern: p) & (MemoryLayout<Float>.alignment - 1) == 0
    }

    /// dst[i] += src[i]
    static func add(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        if isAligned(src) {
            let s = src.bindMemory(to: Float.self, capacity: n)
            for i in 0..<n { dst[i] += s[i] }
        } else {
            for i in 0..<n { dst[i] += src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self) }
        }
    }

    /// dst[i] = (dst[i] + src[i]) / divisor   — the last reduction step, fused with averaging.
    static func addAndDivide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        if isAligned(src) {
            let s = src.bindMemory(to: Float.self, capacity: n)
            for i in 0..<n { dst[i] = (dst[i] + s[i]) / divisor }
        } else {
            for i in 0..<n { dst[i] = (dst[i] + src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)) / divisor }
        }
    }

    /// dst[i] = src[i] / divisor
    static func divide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        if isAligned(src) {
            let s = src.bindMemory(to: Float.self, capacity: n)
            for i in 0..<n { dst[i] = s[i] / divisor }
        } else {
            for i in 0..<n { dst[i] = src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self) / divisor }
        }
    }

    /// dst[i] = src[i]
    static func copy(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        if n > 0 { UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: n &* 4) }
    }
}
