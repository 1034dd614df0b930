import SqueezeEngine

/// A rule that the optimizer step must respect (Deep Compression's pruned and shared weights): the
/// trainer calls it around every SGD step, after the gradients are averaged.
public protocol ParameterConstraint: AnyObject {
    /// Before the SGD step: may change the gradients and the momentum buffers (`optimizer.velocity`).
    func willUpdate(_ parameters: ParameterStore, optimizer: SGD, learningRate: Float)
    /// After the SGD step: may overwrite parameter values.
    func didUpdate(_ parameters: ParameterStore)
}
