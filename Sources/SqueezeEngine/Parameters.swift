/// One named tensor inside a flat parameter buffer. `shape` is PyTorch's (e.g. [Cout, Cin, kh, kw]).
public struct ParameterSpec: Equatable, Sendable {
    public var name: String
    public var shape: [Int]
    public var offset: Int
    public var count: Int { shape.reduce(1, *) }
    public var range: Range<Int> { offset..<(offset + count) }
    public init(name: String, shape: [Int], offset: Int = 0) { self.name = name; self.shape = shape; self.offset = offset }
}

/// All parameters of a model in ONE contiguous buffer and their gradients in another, with named views
/// in state_dict order. An optimizer step is one loop over `values`/`gradients`; an all-reduce bucket
/// is a slice of `gradients`; a checkpoint is a header plus these blobs.
public final class ParameterStore: @unchecked Sendable {
    public let specs: [ParameterSpec]
    public let count: Int
    public let values: FloatBuffer
    public let gradients: FloatBuffer
    fileprivate let index: [String: Int]

    /// `specs` offsets are assigned here, in order.
    public init(_ declared: [ParameterSpec]) {
        var offset = 0
        var specs = [ParameterSpec]()
        for var s in declared {
            s.offset = offset
            offset += s.count
            specs.append(s)
        }
        self.specs = specs
        count = offset
        values = FloatBuffer(count: offset)
        gradients = FloatBuffer(count: offset)
        index = Dictionary(uniqueKeysWithValues: specs.enumerated().map { ($1.name, $0) })
    }

    public func spec(_ name: String) -> ParameterSpec? { index[name].map { specs[$0] } }
    public func value(_ name: String) -> UnsafeMutablePointer<Float> { values.pointer + specs[index[name]!].offset }
    public func gradient(_ name: String) -> UnsafeMutablePointer<Float> { gradients.pointer + specs[index[name]!].offset }
    public var valueBuffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: values.pointer, count: count) }
    public var gradientBuffer: UnsafeMutableBufferPointer<Float> { UnsafeMutableBufferPointer(start: gradients.pointer, count: count) }
    public func copyValues() -> [Float] { Array(UnsafeBufferPointer(valueBuffer)) }
    public func copyGradients() -> [Float] { Array(UnsafeBufferPointer(gradientBuffer)) }
    /// Replaces all values; throws `ParameterCountMismatch` unless `values` has exactly `count`.
    public func load(_ values: [Float]) throws {
        guard values.count == count else { throw ParameterCountMismatch(expected: count, found: values.count) }
        values.withUnsafeBufferPointer { self.values.pointer.update(from: $0.baseAddress!, count: count) }
    }
}

/// A named tensor of a `ParameterStore` that keeps the store alive: layers hold these instead of raw
/// pointers, so a layer can never outlive the buffers it reads and writes. The pointers are computed
/// on each access (one load of the store's buffer pointer).
public struct ParameterView {
    public let store: ParameterStore
    public let spec: ParameterSpec
    /// The values, `spec.count` floats.
    @inline(__always) public var value: UnsafeMutablePointer<Float> { store.values.pointer + spec.offset }
    /// The gradients, `spec.count` floats.
    @inline(__always) public var gradient: UnsafeMutablePointer<Float> { store.gradients.pointer + spec.offset }
}

extension ParameterStore {
    /// The view of parameter `name`, which must exist.
    public func view(_ name: String) -> ParameterView {
        guard let i = index[name] else { preconditionFailure("no parameter named \(name)") }
        return ParameterView(store: self, spec: specs[i])
    }
}

/// `ParameterStore.load` was given another number of values than the store holds.
public struct ParameterCountMismatch: Error, CustomStringConvertible, Sendable, Equatable {
    public let expected: Int
    public let found: Int
    public var description: String { "\(found) parameter values for a store of \(expected)" }
}
