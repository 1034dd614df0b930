#if canImport(Glibc)
import Glibc
#endif

/// SGD with momentum, Nesterov and weight decay, with PyTorch's exact update rule (dampening 0):
///   g ← ∇ + λ·p;  b ← μ·b + g;  g ← g + μ·b (Nesterov) or g ← b;  p ← p − η·g
/// (PyTorch initialises b to g on the first step, which is the same value as μ·0 + g.)
/// Works on the flat parameter and gradient buffers: one loop over all parameters.
///
/// Two variants, both off by default:
/// - `scaledRanges` (BatchNorm's biases with `--bn-bias-lr-scale S`) are trained at S·η with L2
///   weight decay λ/S, so their decay step η·S·(λ/S)·p is the other parameters' (airbench's rule).
/// - `decoupledWeightDecay` (SGDW, Loshchilov & Hutter 2019): λ leaves the gradient and momentum
///   and shrinks every parameter directly by the schedule's factor f = η_t/η (not by η itself):
///   g ← ∇;  b ← μ·b + g;  …;  p ← p − η_t·g − f·λ·p  (p on the right: the weights before the step).
/// - `momentumCorrected` (Deep Gradient Compression's momentum correction): the gradients arrive with
///   momentum already applied, rank by rank before top-k (`DGCOptions`), so the momentum acts on the
///   L2 term alone, as DGC's optimizer does: b ← μ·b + λ·p;  d ← b (Nesterov: λ·p + μ·b);  p ← p − η·(∇ + d).
public final class SGD {
    public var momentum: Float, weightDecay: Float, nesterov: Bool
    /// SGDW's decay in place of L2 (above).
    public var decoupledWeightDecay = false
    /// The gradients carry their momentum already (above).
    public var momentumCorrected = false
    /// Parameter ranges trained at `rangeScale` × the learning rate (above); disjoint.
    public var scaledRanges: [Range<Int>] = []
    public var rangeScale: Float = 1
    /// The momentum buffers, one float per parameter, in parameter order.
    public let velocity: FloatBuffer
    public let count: Int

    public init(parameterCount: Int, momentum: Float = 0.9, weightDecay: Float = 5e-4, nesterov: Bool = false) {
        self.momentum = momentum; self.weightDecay = weightDecay; self.nesterov = nesterov
        count = parameterCount
        velocity = FloatBuffer(count: parameterCount)
    }

    /// One step at learning rate `lr`; `scheduleFactor` (η_t/η) scales the decoupled weight decay only.
    public func step(_ parameters: ParameterStore, learningRate lr: Float, scheduleFactor: Float = 1) {
        precondition(parameters.count == count, "optimizer built for \(count) parameters, model has \(parameters.count)")
        let l2 = decoupledWeightDecay ? 0 : weightDecay
        let decay = decoupledWeightDecay ? scheduleFactor * weightDecay : 0
        var start = 0
        for r in scaledRanges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            update(parameters, start..<r.lowerBound, lr: lr, l2: l2, decay: decay)
            update(parameters, r, lr: lr * rangeScale, l2: l2 / rangeScale, decay: decay)
            start = r.upperBound
        }
        update(parameters, start..<count, lr: lr, l2: l2, decay: decay)
    }

    private func update(_ parameters: ParameterStore, _ range: Range<Int>, lr: Float, l2 wd: Float, decay: Float) {
        let p = parameters.values.pointer, g = parameters.gradients.pointer, b = velocity.pointer
        let (mu, nesterov) = (momentum, nesterov)
        if momentumCorrected {
            for i in range {
                let p0 = p[i]
                var d = wd * p0
                if mu != 0 {
                    b[i] = mu * b[i] + d
                    d = nesterov ? d + mu * b[i] : b[i]
                }
                p[i] = p0 - lr * (g[i] + d)
                if decay != 0 { p[i] -= decay * p0 }
            }
            return
        }
        for i in range {
            let p0 = p[i]
            var d = g[i]
            if wd != 0 { d += wd * p0 }
            if mu != 0 {
                b[i] = mu * b[i] + d
                d = nesterov ? d + mu * b[i] : b[i]
            }
            p[i] = p0 - lr * d
            if decay != 0 { p[i] -= decay * p0 }
        }
    }
}

/// Learning rate as a function of the global step: an optional linear warm-up over the first
/// `warmupSteps` (rate·(s+1)/warmup), then `constant`, `step` (×gamma at each milestone, given as
/// fractions of the steps after warm-up), `cosine` (half a cosine from rate to 0 over the rest) or
/// `linear` (a straight line from rate down to floor·rate over the rest: with a warm-up, the
/// triangular one-cycle shape). With t the fraction of the post-warm-up steps done, 0 ≤ t < 1:
///   linear: rate·(1 − (1 − floor)·t).
public struct LearningRateSchedule: Equatable, Sendable, Codable {
    public enum Kind: String, Sendable, Codable, CaseIterable { case constant, step, cosine, linear }
    public var kind: Kind
    public var baseRate: Float
    public var totalSteps: Int
    public var warmupSteps: Int
    public var milestones: [Double]
    public var gamma: Float
    /// Where `linear` ends, as a fraction of `baseRate`.
    public var floor: Float

    public init(kind: Kind, baseRate: Float, totalSteps: Int, warmupSteps: Int = 0,
                milestones: [Double] = [0.5, 0.75], gamma: Float = 0.1, floor: Float = 0) {
        self.kind = kind; self.baseRate = baseRate; self.totalSteps = max(totalSteps, 1)
        self.warmupSteps = max(warmupSteps, 0); self.milestones = milestones; self.gamma = gamma; self.floor = floor
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
        case .linear:
            return Float(Double(baseRate) * (1 - (1 - Double(floor)) * min(t, 1)))
        }
    }
}
