#if canImport(Glibc)
import Glibc
#endif

/// SGD with momentum, Nesterov and weight decay, with PyTorch's exact update rule (dampening 0):
///   g ← ∇ + λ·p;  b ← μ·b + g;  g ← g + μ·b (Nesterov) or g ← b;  p ← p − η·g
/// (PyTorch initialises b to g on the first step, which is the same value as μ·0 + g.)
/// Works on the flat parameter and gradient buffers: one loop over all parameters.
public final class SGD {
    public var momentum: Float, weightDecay: Float, nesterov: Bool
    /// The momentum buffers, one float per parameter, in parameter order.
    public let velocity: FloatBuffer
    public let count: Int

    public init(parameterCount: Int, momentum: Float = 0.9, weightDecay: Float = 5e-4, nesterov: Bool = false) {
        self.momentum = momentum; self.weightDecay = weightDecay; self.nesterov = nesterov
        count = parameterCount
        velocity = FloatBuffer(count: parameterCount)
    }

    public func step(_ parameters: ParameterStore, learningRate lr: Float) {
        precondition(parameters.count == count, "optimizer built for \(count) parameters, model has \(parameters.count)")
        let p = parameters.values.pointer, g = parameters.gradients.pointer, b = velocity.pointer
        let (mu, wd, nesterov) = (momentum, weightDecay, nesterov)
        for i in 0..<count {
            var d = g[i]
            if wd != 0 { d += wd * p[i] }
            if mu != 0 {
                b[i] = mu * b[i] + d
                d = nesterov ? d + mu * b[i] : b[i]
            }
            p[i] -= lr * d
        }
    }
}

/// Learning rate as a function of the global step: an optional linear warm-up over the first
/// `warmupSteps` (rate·(s+1)/warmup), then `constant`, `step` (×gamma at each milestone, given as
/// fractions of the steps after warm-up) or `cosine` (half a cosine from rate to 0 over the rest).
public struct LearningRateSchedule: Equatable, Sendable, Codable {
    public enum Kind: String, Sendable, Codable, CaseIterable { case constant, step, cosine }
    public var kind: Kind
    public var baseRate: Float
    public var totalSteps: Int
    public var warmupSteps: Int
    public var milestones: [Double]
    public var gamma: Float

    public init(kind: Kind, baseRate: Float, totalSteps: Int, warmupSteps: Int = 0,
                milestones: [Double] = [0.5, 0.75], gamma: Float = 0.1) {
        self.kind = kind; self.baseRate = baseRate; self.totalSteps = max(totalSteps, 1)
        self.warmupSteps = max(warmupSteps, 0); self.milestones = milestones; self.gamma = gamma
    }

    public func rate(at step: Int) -> Float {
        if step < warmupSteps { return baseRate * Float(step + 1) / Float(warmupSteps) }
        let span = max(totalSteps - warmupSteps, 1)
        let t = Double(step - warmupSteps) / Double(span)
        switch kind {
        case .constant:
            return baseRate
        case .step:
            return milestones.reduce(baseRate) { t >= $1 ? $0 * gamma : $0 }
        case .cosine:
            return Float(0.5 * Double(baseRate) * (1 + cos(Double.pi * min(t, 1))))
        }
    }
}
