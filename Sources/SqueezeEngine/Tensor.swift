#if canImport(Glibc)
import Glibc
#endif

/// The shape of a batch of feature maps. Activations are stored CHANNEL-MAJOR, (C, N, H, W):
/// element [c][n][h][w] lives at ((c·N + n)·H + h)·W + w. A 1×1 convolution is then one GEMM over
/// the whole batch, (Cout × Cin) · (Cin × N·H·W), and a concatenation along channels is two
/// adjacent row ranges of one buffer.
public struct Shape: Equatable, Hashable, Sendable, CustomStringConvertible {
    public var c: Int, n: Int, h: Int, w: Int
    public init(c: Int, n: Int, h: Int, w: Int) { (self.c, self.n, self.h, self.w) = (c, n, h, w) }
    /// Elements in one channel: N·H·W (the GEMM column count).
    public var columns: Int { n * h * w }
    /// Elements in one image plane: H·W.
    public var plane: Int { h * w }
    public var count: Int { c * n * h * w }
    public var description: String { "(C \(c), N \(n), H \(h), W \(w))" }
}

/// A non-owning view of channel-major data, or in training of oneDNN's blocked layout (`block`, see
/// Blocked.swift). Whoever allocated `data` (a layer's workspace, the parameter store, a data loader)
/// keeps it alive for as long as the view is used.
public struct Tensor {
    public var data: UnsafeMutablePointer<Float>
    public var shape: Shape
    /// 0: channel-major (C, N, H, W). 8 or 16: blocked nChw8c / nChw16c, element [n][c][h][w] at
    /// n·imageStride + ((c / block)·H·W + h·W + w)·block + c % block.
    public internal(set) var block = 0
    /// Blocked only: floats from one image to the next (C·H·W, or more for a channel slice of a wider tensor).
    public internal(set) var imageStride = 0
    public init(data: UnsafeMutablePointer<Float>, shape: Shape) { self.data = data; self.shape = shape }
    /// Row `c` (one channel over the whole batch): N·H·W contiguous floats.
    @inline(__always) public func channel(_ c: Int) -> UnsafeMutablePointer<Float> { data + c * shape.columns }
}

/// A 64-byte-aligned, owned Float allocation. Reused across steps; only grows.
public final class FloatBuffer: @unchecked Sendable {
    public private(set) var pointer: UnsafeMutablePointer<Float>
    public private(set) var capacity: Int

    public init(count: Int = 0) {
        capacity = max(count, 16)
        pointer = FloatBuffer.allocate(capacity)
        pointer.initialize(repeating: 0, count: capacity)
    }

    deinit { free(pointer) }

    /// Returns storage for at least `count` floats. Contents are kept only if no growth was needed.
    @discardableResult
    public func reserve(_ count: Int) -> UnsafeMutablePointer<Float> {
        if count > capacity {
            free(pointer)
            capacity = count
            pointer = FloatBuffer.allocate(count)
            pointer.initialize(repeating: 0, count: count)
        }
        return pointer
    }

    public func zero(_ count: Int? = nil) { pointer.update(repeating: 0, count: count ?? capacity) }

    public var array: [Float] { Array(UnsafeBufferPointer(start: pointer, count: capacity)) }

    private static func allocate(_ count: Int) -> UnsafeMutablePointer<Float> {
        var raw: UnsafeMutableRawPointer?
        let status = posix_memalign(&raw, 64, count * MemoryLayout<Float>.stride)
        guard status == 0, let raw else { fatalError("out of memory allocating \(count) floats") }
        return raw.bindMemory(to: Float.self, capacity: count)
    }
}

/// A workspace holding one tensor whose shape is set per batch (a layer's output or input gradient).
final class Slot {
    let buffer = FloatBuffer()
    func tensor(_ shape: Shape) -> Tensor { Tensor(data: buffer.reserve(shape.count), shape: shape) }
    /// Dense, blocked with `block` (0: channel-major).
    func tensor(_ shape: Shape, block: Int) -> Tensor {
        block == 0 ? tensor(shape) : Tensor(blocked: buffer.reserve(shape.count), shape: shape, block: block)
    }
}
