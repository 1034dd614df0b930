// Element-wise Float loops used by the reductions.
//
// Sources are raw pointers into received messages, which need not be 4-byte aligned
// (ZeroMQ may place a small frame anywhere inside its receive batch), and destinations
// may in principle alias them, so the auto-vectoriser gives up on the plain loops. These
// loops therefore work in explicit SIMD16<Float> blocks with unaligned loads and stores,
// then finish the tail element by element. Every lane does exactly the scalar IEEE
// operation, so results are bit-identical to the naive loops (checked in KernelTests).

enum FloatKernels {
    typealias Block = SIMD16<Float>
    static let width = Block.scalarCount

    /// dst[i] += src[i]
    static func add(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        let d = UnsafeMutableRawPointer(dst)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            let sum = d.loadUnaligned(fromByteOffset: o, as: Block.self) + src.loadUnaligned(fromByteOffset: o, as: Block.self)
            d.storeBytes(of: sum, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] += src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)
            i &+= 1
        }
    }

    /// dst[i] = (dst[i] + src[i]) / divisor   — the last reduction step, fused with averaging.
    static func addAndDivide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        let d = UnsafeMutableRawPointer(dst)
        let q = Block(repeating: divisor)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            let sum = d.loadUnaligned(fromByteOffset: o, as: Block.self) + src.loadUnaligned(fromByteOffset: o, as: Block.self)
            d.storeBytes(of: sum / q, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] = (dst[i] + src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)) / divisor
            i &+= 1
        }
    }

    /// dst[i] = src[i] / divisor
    static func divide(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int, divisor: Float) {
        let d = UnsafeMutableRawPointer(dst)
        let q = Block(repeating: divisor)
        var i = 0
        while i &+ width <= n {
            let o = i &* 4
            d.storeBytes(of: src.loadUnaligned(fromByteOffset: o, as: Block.self) / q, toByteOffset: o, as: Block.self)
            i &+= width
        }
        while i < n {
            dst[i] = src.loadUnaligned(fromByteOffset: i &* 4, as: Float.self) / divisor
            i &+= 1
        }
    }

    /// dst[i] = src[i]
    static func copy(_ dst: UnsafeMutablePointer<Float>, _ src: UnsafeRawPointer, count n: Int) {
        if n > 0 { UnsafeMutableRawPointer(dst).copyMemory(from: src, byteCount: n &* 4) }
    }
}
