import Foundation
import SqueezeData
import SqueezeEngine
import SqueezeSystem

/// Averages gradients across data-parallel workers. The trainer calls `gradientsReady` for each
/// layer's flat gradient range as soon as backward has finished it (in reverse layer order), then
/// `finish` before the optimizer step; after `finish` every worker must hold the average.
public protocol GradientReducer: AnyObject {
    func gradientsReady(_ range: Range<Int>, of gradients: UnsafeMutableBufferPointer<Float>)
    func finish(_ gradients: UnsafeMutableBufferPointer<Float>) throws
}

/// What one training step did.
public struct StepResult: Sendable {
    public var step: Int
    public var epoch: Int
    public var loss: Float
    public var correct: Int
    public var images: Int
    public var learningRate: Float
    /// Forward + backward + optimizer, without waiting for data or the gradient exchange's tail.
    public var computeSeconds: Double
    /// Time spent in `GradientReducer.finish` (the part of communication not hidden behind backward).
    public var reduceSeconds: Double
}

/// Test-set evaluation: accuracy, mean loss and the confusion matrix (rows: true class, columns: predicted).
public struct Evaluation: Sendable, Codable {
    public var images: Int
    public var loss: Double
    public var accuracy: Double
    public var confusion: [[Int]]
    public var perClassAccuracy: [Double] {
        confusion.indices.map { i in
            let n = confusion[i].reduce(0, +)
            return n == 0 ? 0 : Double(confusion[i][i]) / Double(n)
        }
    }
}

/// One process's share of a training run: the model, the optimizer, this rank's sampler and the
/// step counter. With one worker it is the whole single-process trainer.
public final class Trainer {
    public let config: TrainingConfig
    public let network: Network
    public let optimizer: SGD
    public private(set) var sampler: ShardedSampler
    public let schedule: LearningRateSchedule
    public let trainSet: CIFAR10
    /// The moving average of the weights (`config.ema`; nil: none). Evaluation uses it, and
    /// `TrainingLoop` leaves it in `network` when a run ends.
    public let average: WeightAverage?
    /// This worker's place among `worldSize` (an elastic run changes both: `reshard`).
    public private(set) var rank: Int, worldSize: Int
    /// Steps completed (global, counting steps before a resume).
    public var step = 0
    /// Applied around every optimizer step (pruning masks, weight sharing); nil: plain SGD.
    public var constraint: ParameterConstraint?
    /// The run's timeline (nil: not traced): each step's phases here, the layers in the network's.
    public var tracer: Tracer? {
        didSet { network.tracer = tracer }
    }
    private let lossGradient = FloatBuffer()

    public init(config: TrainingConfig, trainSet: CIFAR10, rank: Int = 0, worldSize: Int = 1) throws {
        guard config.batchSize % worldSize == 0 else {
            throw TrainingError.invalidConfiguration("--batch-size \(config.batchSize) does not divide evenly over \(worldSize) workers")
        }
        guard config.model.classes >= CIFAR10.classNames.count else {
            throw TrainingError.invalidConfiguration(
                "--classes \(config.model.classes): CIFAR-10's labels go up to \(CIFAR10.classNames.count - 1), so the model needs at least \(CIFAR10.classNames.count) classes")
        }
        self.config = config
        self.trainSet = trainSet
        self.rank = rank; self.worldSize = worldSize
        network = Network(config: config.model, seed: config.seed)
        network.precision = config.precision ?? .fp32
        optimizer = SGD(parameterCount: network.parameters.count, momentum: config.momentum,
                        weightDecay: config.weightDecay, nesterov: config.nesterov)
        optimizer.decoupledWeightDecay = config.decoupledWeightDecay ?? false
        optimizer.momentumCorrected = config.dgc?.momentumCorrection == true
        if let scale = config.bnBiasLearningRateScale {
            optimizer.scaledRanges = network.parameters.specs.filter { $0.name.hasSuffix("_bn.bias") }.map(\.range)
            optimizer.rangeScale = scale
        }
        do {
            sampler = try ShardedSampler(count: trainSet.count, numShards: worldSize, rank: rank,
                                         globalBatchSize: config.batchSize, shuffle: config.shuffle, seed: config.seed)
        } catch {
            throw TrainingError.invalidConfiguration(String(describing: error))
        }
        schedule = config.learningRateSchedule(stepsPerEpoch: sampler.batchesPerEpoch)
        let (network, perEpoch) = (network, sampler.batchesPerEpoch)
        average = config.ema.map { WeightAverage($0, stepsPerEpoch: perEpoch, totalSteps: config.totalSteps, network: network) }
    }

    /// From the next step on, the global batches are divided over `numShards` workers and this one
    /// holds `rank` (an elastic run's change of members, between two steps): the rest of the epoch is
    /// the same global batches (`ShardedSampler.resharded`); a loader made before this still reads the old shard.
    public func reshard(numShards: Int, rank: Int) throws {
        do { sampler = try sampler.resharded(numShards: numShards, rank: rank) } catch {
            throw TrainingError.invalidConfiguration(String(describing: error))
        }
        self.rank = rank; worldSize = numShards
    }

    public var stepsPerEpoch: Int { sampler.batchesPerEpoch }
    public var epoch: Int { step / stepsPerEpoch }
    public var position: BatchPosition { BatchPosition(epoch: step / stepsPerEpoch, batch: step % stepsPerEpoch) }
    public var isFinished: Bool { step >= config.totalSteps }

    /// A loader producing this rank's batches from the current step to the end of the run.
    public func makeLoader() -> BatchLoader {
        let end = BatchPosition(epoch: config.totalSteps / stepsPerEpoch, batch: config.totalSteps % stepsPerEpoch)
        return BatchLoader(dataset: trainSet, sampler: sampler, augmentSeed: config.augment ? config.seed : nil,
                           cutout: config.cutout ?? 0, translate: config.translate ?? 4, flip: config.flip ?? .random,
                           start: position, end: end, imageSize: config.imageSize)
    }

    /// Forward, backward (handing finished gradient ranges to `reducer`), gradient average, SGD step.
    public func trainStep(_ batch: BatchLoader.Batch, reducer: GradientReducer? = nil) throws -> StepResult {
        precondition(batch.position == position, "batch for \(batch.position) at \(position)")
        let t0 = DispatchTime.now().uptimeNanoseconds
        // The average starts from the weights the run starts from (--init-weights are loaded after init).
        if step == 0 { average?.reset(to: network) }
        // Dropout masks are a function of (seed, rank, step), like the augmentation: a resumed run
        // draws the same masks without any generator state in the checkpoint, and ranks differ.
        for (i, dropout) in network.dropouts.enumerated() {
            dropout.rng = SeededRNG(seed: config.seed, stream: (0xD0_0000_0000 &+ UInt64(i) << 40) &+ UInt64(rank) << 32 &+ UInt64(step))
        }
        let x = Tensor(data: UnsafeMutablePointer(mutating: batch.images),
                       shape: Shape(c: 3, n: batch.count, h: batch.imageSize, w: batch.imageSize))
        let grads = network.parameters.gradientBuffer
        let logits = traced(tracer, .compute, "forward", "forward", ["step": step]) { network.forward(x, training: true) }
        let dl = Tensor(data: lossGradient.reserve(logits.shape.count), shape: logits.shape)
        let (loss, correct) = softmaxCrossEntropy(logits: logits.data, classes: logits.shape.c, batch: logits.shape.n,
                                                  labels: batch.labels, labelSmoothing: config.labelSmoothing ?? 0,
                                                  gradient: dl.data)
        // Before backward and the all-reduce: a non-finite loss must not reach the weights (or, in a
        // cluster, every other worker's weights through the average).
        guard loss.isFinite else {
            throw TrainingError.nonFinite("step \(step + 1) (epoch \(epoch + 1)): the training loss is \(loss); the weights of step \(step) "
                + "are kept. The usual cause is a learning rate too high for this model (--lr \(config.learningRate), now "
                + "\(schedule.rate(at: step))); lower it, or add --warmup-epochs")
        }
        traced(tracer, .compute, "backward", "backward", ["step": step]) {
            if let reducer {
                network.backward(dl) { reducer.gradientsReady($0, of: grads) }
            } else {
                network.backward(dl)
            }
        }
        let t1 = DispatchTime.now().uptimeNanoseconds
        if let reducer { try traced(tracer, .compute, "wait", "wait for all-reduce", ["step": step]) { try reducer.finish(grads) } }
        let t2 = DispatchTime.now().uptimeNanoseconds
        let lr = schedule.rate(at: step)
        // A finite loss can still give an overflowing gradient (or, in a cluster, a peer's average
        // can): it must not reach the weights either.
        if let bad = firstNonFinite(UnsafeBufferPointer(grads)) {
            throw TrainingError.nonFinite("step \(step + 1) (epoch \(epoch + 1)): gradient entry \(bad) is \(grads[bad]) after "
                + (reducer == nil ? "backward" : "the all-reduce") + " (loss \(loss)); the weights of step \(step) are kept. "
                + "The usual cause is a learning rate too high (--lr \(config.learningRate), now \(lr)); lower it, or add --warmup-epochs")
        }
        traced(tracer, .compute, "optimizer", "optimizer step", ["step": step]) {
            constraint?.willUpdate(network.parameters, optimizer: optimizer, learningRate: lr)
            optimizer.step(network.parameters, learningRate: lr, scheduleFactor: lr / config.learningRate)
            constraint?.didUpdate(network.parameters)
            average?.update(network, step: step + 1)
        }
        let t3 = DispatchTime.now().uptimeNanoseconds
        let result = StepResult(step: step, epoch: epoch, loss: loss, correct: correct, images: batch.count,
                                learningRate: lr, computeSeconds: Double(t1 - t0 + t3 - t2) * 1e-9,
                                reduceSeconds: Double(t2 - t1) * 1e-9)
        step += 1
        return result
    }

    /// Eval-mode accuracy on `dataset` (no augmentation), in batches of `batchSize`; of the averaged
    /// weights when the run keeps an average (`--ema`).
    public func evaluate(_ dataset: CIFAR10, indices: [Int]? = nil, batchSize: Int = 500) -> Evaluation {
        let run = { Trainer.evaluate(self.network, dataset, indices: indices, batchSize: batchSize, imageSize: self.config.imageSize) }
        return average.map { $0.withAverage(in: network, run) } ?? run()
    }

    /// Evaluates `indices` of `dataset` (all records when nil). With `flip`, each image is also
    /// classified mirrored left to right and the two softmax outputs are averaged (test-time
    /// augmentation); the loss is then the cross-entropy of that average.
    public static func evaluate(_ network: Network, _ dataset: CIFAR10, indices subset: [Int]? = nil,
                                batchSize: Int = 500, imageSize: Int = 32, flip: Bool = false) -> Evaluation {
        let all = subset ?? Array(0..<dataset.count)
        let classes = network.config.classes
        var confusion = [[Int]](repeating: [Int](repeating: 0, count: classes), count: classes)
        var lossSum = 0.0
        let raw = FloatBuffer(count: 3 * batchSize * 32 * 32)
        let sized = FloatBuffer(count: imageSize == 32 ? 0 : 3 * batchSize * imageSize * imageSize)
        for start in stride(from: 0, to: all.count, by: batchSize) {
            let indices = Array(all[start..<min(start + batchSize, all.count)])
            let n = indices.count
            let labels: [Int32]
            do { labels = try dataset.fillBatch(indices: indices, into: raw.pointer) } catch { preconditionFailure("evaluate: \(error)") }
            var input = raw.pointer
            if imageSize != 32 {
                upsampleBilinear(raw.pointer, planes: 3 * n, from: 32, to: imageSize, into: sized.pointer)
                input = sized.pointer
            }
            let x = Tensor(data: input, shape: Shape(c: 3, n: n, h: imageSize, w: imageSize))
            var views = [network.predict(x)]
            if flip {
                mirrorRows(input, rows: 3 * n * imageSize, width: imageSize)
                views.append(network.predict(x))
            }
            var p = [Double](repeating: 0, count: classes)
            for j in 0..<n {
                for c in 0..<classes { p[c] = 0 }
                for logits in views {
                    let top = (0..<classes).map { Double(logits[$0 * n + j]) }.max()!
                    let e = (0..<classes).map { exp(Double(logits[$0 * n + j]) - top) }
                    let sum = e.reduce(0, +)
                    for c in 0..<classes { p[c] += e[c] / sum / Double(views.count) }
                }
                let best = p.indices.max { p[$0] < p[$1] }!
                confusion[Int(labels[j])][best] += 1
                lossSum -= log(max(p[Int(labels[j])], .leastNormalMagnitude))
            }
        }
        let correct = (0..<classes).reduce(0) { $0 + confusion[$1][$1] }
        return Evaluation(images: all.count, loss: lossSum / Double(max(all.count, 1)),
                          accuracy: Double(correct) / Double(max(all.count, 1)), confusion: confusion)
    }
}

/// Reverses each of `rows` consecutive rows of `width` floats in place (a horizontal flip).
func mirrorRows(_ data: UnsafeMutablePointer<Float>, rows: Int, width: Int) {
    for r in 0..<rows {
        var row = UnsafeMutableBufferPointer(start: data + r * width, count: width)
        row.reverse()
    }
}

public enum TrainingError: Error, CustomStringConvertible {
    case invalidConfiguration(String)
    case checkpoint(String)
    /// The loss (or a gradient) stopped being a finite number.
    case nonFinite(String)

    public var description: String {
        switch self {
        case .invalidConfiguration(let m): return m
        case .checkpoint(let m): return m
        case .nonFinite(let m): return "training diverged at " + m
        }
    }
}

/// The index of the first NaN or infinity in `values`, if any: 0·x is NaN exactly when x is NaN or
/// infinite, so one branch-free pass decides, and only a bad gradient pays for the search.
func firstNonFinite(_ values: UnsafeBufferPointer<Float>) -> Int? {
    var sum: Float = 0
    for v in values { sum += v * 0 }  // 0·x is NaN exactly for NaN and ±infinity
    return sum.isNaN ? values.firstIndex { !$0.isFinite } : nil
}
