import Foundation
import SqueezeEngine

/// `--ema`: how the exponential moving average of the weights is kept (part of `TrainingConfig`).
public struct EMASettings: Codable, Equatable, Sendable {
    /// Weight of the old average in each update: e ← decay·e + (1 − decay)·w, in (0, 1).
    public var decay: Float
    /// Epochs during which the average only follows the weights (e ← w); averaging starts after them.
    public var startEpochs: Double
    /// Steps between updates once averaging has started (1: every step).
    public var every: Int
    /// airbench's Lookahead variant: after every update the weights are set to the average.
    public var lookahead: Bool
    /// The update after step t uses decay·(t/T)^power (T: the run's steps), so that the average follows the
    /// weights closely early on and averages strongly at the end, as airbench's (nil: 0, a constant decay).
    public var decayPower: Double?

    public init(decay: Float, startEpochs: Double = 0, every: Int = 1, lookahead: Bool = false, decayPower: Double? = nil) {
        self.decay = decay; self.startEpochs = startEpochs; self.every = every; self.lookahead = lookahead
        self.decayPower = decayPower
    }

    /// The decay of the update after `step` of `totalSteps` steps.
    public func decay(step: Int, totalSteps: Int) -> Float {
        guard let power = decayPower, power != 0 else { return decay }
        return decay * Float(pow(Double(step) / Double(max(totalSteps, 1)), power))
    }
}

/// An exponential moving average (Polyak averaging) of a network's parameters and buffers
/// (BatchNorm's running statistics), in flat buffers laid out as the network's.
///
/// With S = the start step (`startEpochs` × steps per epoch) and w_t the weights after t steps:
///   e_0 = w_0;  e_t = w_t for t ≤ S;  e_t = d_t·e_{t−K} + (1 − d_t)·w_t when t − S is a multiple of K
/// (K = `every`), and unchanged at the other steps; d_t = d, or d·(t/T)^power with `decayPower`.
/// So with K = 1 and a constant d, e_T = d^(T−S)·w_S + Σ_{t=S+1}^{T} (1 − d)·d^(T−t)·w_t.
/// With `lookahead`, w_t ← e_t after each update: training continues from the average.
public final class WeightAverage {
    public let settings: EMASettings
    public let startStep: Int, totalSteps: Int
    /// The averaged parameters and buffers, in the order of `network.parameters` and `network.buffers`.
    public let parameters: FloatBuffer, buffers: FloatBuffer
    private let parameterCount: Int, bufferCount: Int

    public init(_ settings: EMASettings, stepsPerEpoch: Int, totalSteps: Int, network: Network) {
        self.settings = settings; self.totalSteps = totalSteps
        startStep = Int((settings.startEpochs * Double(stepsPerEpoch)).rounded())
        parameterCount = network.parameters.count; bufferCount = network.buffers.count
        parameters = FloatBuffer(count: parameterCount); buffers = FloatBuffer(count: bufferCount)
        reset(to: network)
    }

    /// e ← w.
    public func reset(to network: Network) {
        parameters.pointer.update(from: network.parameters.values.pointer, count: parameterCount)
        buffers.pointer.update(from: network.buffers.values.pointer, count: bufferCount)
    }

    /// After the optimizer step that brought the run to `step` steps done.
    public func update(_ network: Network, step: Int) {
        if step <= startStep { return reset(to: network) }
        guard (step - startStep) % settings.every == 0 else { return }
        let d = settings.decay(step: step, totalSteps: totalSteps)
        func lerp(_ e: UnsafeMutablePointer<Float>, _ w: UnsafeMutablePointer<Float>, _ n: Int) {
            for i in 0..<n { e[i] = d * e[i] + (1 - d) * w[i] }
            if settings.lookahead { w.update(from: e, count: n) }
        }
        lerp(parameters.pointer, network.parameters.values.pointer, parameterCount)
        lerp(buffers.pointer, network.buffers.values.pointer, bufferCount)
    }

    /// Runs `body` with the average in `network` (for evaluation), then puts the weights back.
    public func withAverage<R>(in network: Network, _ body: () throws -> R) rethrows -> R {
        swapContents(network)
        defer { swapContents(network) }
        return try body()
    }

    /// w ← e: the network takes the average for good (the end of a run).
    public func adopt(into network: Network) {
        network.parameters.values.pointer.update(from: parameters.pointer, count: parameterCount)
        network.buffers.values.pointer.update(from: buffers.pointer, count: bufferCount)
    }

    private func swapContents(_ network: Network) {
        func swap(_ a: UnsafeMutablePointer<Float>, _ b: UnsafeMutablePointer<Float>, _ n: Int) {
            for i in 0..<n { (a[i], b[i]) = (b[i], a[i]) }
        }
        swap(parameters.pointer, network.parameters.values.pointer, parameterCount)
        swap(buffers.pointer, network.buffers.values.pointer, bufferCount)
    }
}
