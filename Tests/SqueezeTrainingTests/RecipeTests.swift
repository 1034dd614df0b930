import Foundation
import Testing
import SqueezeData
import SqueezeEngine
@testable import SqueezeTraining

/// The fast-CIFAR-10 tricks of the training recipe: the moving average of the weights (`--ema`), the
/// BatchNorm bias learning-rate scale, decoupled weight decay and the linear schedule.
@Suite("Recipe tricks")
struct RecipeTests {
    /// A deterministic BatchNorm run (so there are buffers to average too) with `ema`.
    func config(steps: Int, ema: EMASettings?) -> TrainingConfig {
        var c = deterministicConfig(steps: steps, batch: 8)
        c.model.batchNorm = true
        c.ema = ema
        return c
    }

    /// Parameters then buffers, as one array.
    func weights(_ network: Network) -> [Float] { network.parameters.copyValues() + network.buffers.copyValues() }
    func average(_ a: WeightAverage, _ network: Network) -> [Float] {
        Array(UnsafeBufferPointer(start: a.parameters.pointer, count: network.parameters.count))
            + Array(UnsafeBufferPointer(start: a.buffers.pointer, count: network.buffers.count))
    }

    /// Largest difference relative to the largest magnitude of `want`.
    func relativeError(_ got: [Float], _ want: [Double]) -> Double {
        let scale = want.reduce(0) { max($0, abs($1)) }
        return zip(got, want).reduce(0) { max($0, abs(Double($1.0) - $1.1)) } / scale
    }

    /// Trains `steps` steps and returns the weights before the first and after every step.
    func trajectory(_ trainer: Trainer, steps: Int) throws -> [[Float]] {
        let loader = trainer.makeLoader()
        defer { loader.stop() }
        var w = [weights(trainer.network)]
        for _ in 0..<steps {
            _ = try trainer.trainStep(try #require(loader.next()))
            w.append(weights(trainer.network))
        }
        return w
    }

    /// e_T = d^T·w_0 + Σ_{t=1}^{T} (1 − d)·d^(T−t)·w_t over parameters and BatchNorm statistics alike.
    @Test func emaIsTheClosedFormOverAFewSteps() throws {
        let d = 0.75, steps = 4
        let trainer = try Trainer(config: config(steps: steps, ema: EMASettings(decay: Float(d))), trainSet: firstTrainingFile)
        let w = try trajectory(trainer, steps: steps)
        var want = w[0].map { pow(d, Double(steps)) * Double($0) }
        for t in 1...steps {
            for i in want.indices { want[i] += (1 - d) * pow(d, Double(steps - t)) * Double(w[t][i]) }
        }
        let got = average(try #require(trainer.average), trainer.network)
        #expect(relativeError(got, want) < 1e-5)
        #expect(trainer.network.buffers.count > 0 && w[steps] != w[0])
        #expect(relativeError(got, w[steps].map(Double.init)) > 1e-3, "the average is not the last weights")
    }

    /// With a decay power P the update after step t uses d·(t/T)^P: e_t = d_t·e_{t−1} + (1 − d_t)·w_t.
    @Test func emaDecayRisesOverTheRunWithAPower() throws {
        let settings = EMASettings(decay: 0.9, decayPower: 2)
        #expect(settings.decay(step: 2, totalSteps: 4) == 0.9 * 0.25 && settings.decay(step: 4, totalSteps: 4) == 0.9)
        let trainer = try Trainer(config: config(steps: 4, ema: settings), trainSet: firstTrainingFile)
        let w = try trajectory(trainer, steps: 4)
        var want = w[0].map(Double.init)
        for t in 1...4 {
            let d = 0.9 * pow(Double(t) / 4, 2)
            for i in want.indices { want[i] = d * want[i] + (1 - d) * Double(w[t][i]) }
        }
        #expect(relativeError(average(try #require(trainer.average), trainer.network), want) < 1e-5)
    }

    /// Following until the start step S, then an update every K steps; with Lookahead the weights become the average.
    @Test(arguments: [false, true]) func emaStartsAfterItsEpochsAndUpdatesEveryKSteps(lookahead: Bool) throws {
        let d: Float = 0.5, perEpoch = try firstTrainingFile.count / 8  // 10,000 records in CIFAR-10's file, fewer in the generated one
        let settings = EMASettings(decay: d, startEpochs: 2 / Double(perEpoch), every: 2, lookahead: lookahead)
        let trainer = try Trainer(config: config(steps: 5, ema: settings), trainSet: firstTrainingFile)
        let a = try #require(trainer.average)
        #expect(a.startStep == 2)
        let w = try trajectory(trainer, steps: 5)
        let e = average(a, trainer.network)
        if lookahead {
            // The update after step 4 put the average into the weights; step 5 (no update) moved them on.
            let tookTheAverage = e == w[4] && w[5] != w[4]  // outside #expect: a failing comparison of large arrays is diffed for minutes
            #expect(tookTheAverage)
            #expect(relativeError(e, w[2].map(Double.init)) > 1e-4, "the average moved after the start step")
        } else {
            // e_2 = w_2, e_3 = e_2, e_4 = d·w_2 + (1 − d)·w_4, e_5 = e_4 (computed in Float as the update does).
            let closedForm = e == zip(w[2], w[4]).map { d * $0 + (1 - d) * $1 }
            #expect(closedForm)
        }
    }

    /// Evaluation sees the average and leaves the weights as they were; the end of a run leaves the average in the network.
    @Test func evaluationAndTheFinalWeightsUseTheAverage() throws {
        let trainer = try Trainer(config: config(steps: 3, ema: EMASettings(decay: 0.9)), trainSet: firstTrainingFile)
        _ = try trajectory(trainer, steps: 2)
        let raw = weights(trainer.network)
        let evaluated = trainer.evaluate(try firstTrainingFile, indices: Array(0..<64))
        #expect(weights(trainer.network) == raw)
        let copy = Network(config: trainer.config.model)
        let avg = try #require(trainer.average)
        copy.parameters.values.pointer.update(from: avg.parameters.pointer, count: copy.parameters.count)
        copy.buffers.values.pointer.update(from: avg.buffers.pointer, count: copy.buffers.count)
        let direct = Trainer.evaluate(copy, try firstTrainingFile, indices: Array(0..<64))
        #expect(evaluated.confusion == direct.confusion && evaluated.loss == direct.loss)

        var options = RunOptions()
        options.quiet = true
        _ = try runTraining(trainer, testSet: nil, options: options)
        #expect(trainer.step == 3 && weights(trainer.network) == average(avg, trainer.network))
    }

    /// Stop after 3 of 6 steps, checkpoint, resume: weights, momentum and average as the straight run's.
    @Test func emaSurvivesCheckpointAndResumeBitExactly() throws {
        var c = config(steps: 6, ema: EMASettings(decay: 0.8, every: 2))
        c.augment = true; c.shuffle = true
        let straight = try Trainer(config: c, trainSet: firstTrainingFile)
        _ = try train(straight, steps: 6)

        let dir = try temporaryDirectory("ema-resume")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try Trainer(config: c, trainSet: firstTrainingFile)
        _ = try train(first, steps: 3)
        let checkpoint = try Checkpoint.load(path: try Checkpoint(trainer: first).save(directory: dir))
        let resumed = try Trainer(config: c, trainSet: firstTrainingFile)
        try checkpoint.restore(into: resumed)
        _ = try train(resumed, steps: 3)
        let sameWeights = weights(resumed.network) == weights(straight.network)
        let sameAverage = average(try #require(resumed.average), resumed.network) == average(try #require(straight.average), straight.network)
        #expect(sameWeights)
        #expect(sameAverage)

        // Resuming needs the same --ema: a run without it (or with another decay) is refused, naming the field.
        for other in [nil, EMASettings(decay: 0.9, every: 2)] {
            var d = c
            d.ema = other
            let refused = try Trainer(config: d, trainSet: firstTrainingFile)
            #expect(throws: TrainingError.self) { try checkpoint.restore(into: refused) }
            do { try checkpoint.restore(into: refused) } catch {
                #expect("\(error)".contains("ema.decay was") && !"\(error)".contains("model."), "only --ema differs: \(error)")
            }
        }
        // And a checkpoint without an average (an older run's) is refused by a run with --ema.
        var plain = c
        plain.ema = nil
        let old = try Trainer(config: plain, trainSet: firstTrainingFile)
        _ = try train(old, steps: 1)
        let oldCheckpoint = try Checkpoint.load(path: Checkpoint(trainer: old).save(directory: dir + "/old"))
        #expect(oldCheckpoint.tensors.keys.allSatisfy { !$0.hasPrefix("ema.") })
        do {
            try oldCheckpoint.restore(into: try Trainer(config: c, trainSet: firstTrainingFile))
            Issue.record("a checkpoint without an average resumed a run with --ema")
        } catch {
            #expect("\(error)".contains("ema.decay was unset, now 0."), "\(error)")
        }
    }

    /// With momentum 0 one step is p − η·(∇ + λ·p): BatchNorm's biases, and only they, take S·η and λ/S.
    @Test func bnBiasLearningRateScaleAppliesOnlyToBatchNormBiases() throws {
        var c = config(steps: 1, ema: nil)
        c.momentum = 0
        c.bnBiasLearningRateScale = 8
        let trainer = try Trainer(config: c, trainSet: firstTrainingFile)
        let params = trainer.network.parameters
        // BatchNorm's biases start at 0, which would hide their weight decay.
        for spec in params.specs where spec.name.hasSuffix("_bn.bias") { params.value(spec.name).update(repeating: 0.5, count: spec.count) }
        let before = params.copyValues()
        let loader = trainer.makeLoader()
        defer { loader.stop() }
        _ = try trainer.trainStep(try #require(loader.next()))
        let after = params.copyValues(), g = params.copyGradients()
        let (lr, wd, s) = (c.learningRate, c.weightDecay, Float(8))
        var scaled = 0, plain = 0
        for spec in params.specs {
            let isBias = spec.name.hasSuffix("_bn.bias")
            let (rate, decay) = isBias ? (lr * s, wd / s) : (lr, wd)
            let expected = spec.range.map { before[$0] - rate * (g[$0] + decay * before[$0]) }
            #expect(Array(after[spec.range]) == expected, "\(spec.name)")
            if isBias { scaled += spec.count } else { plain += spec.count }
        }
        #expect(scaled > 0 && plain > 0 && trainer.optimizer.scaledRanges.count == trainer.network.buffers.specs.count / 2)
        #expect(g.contains { $0 != 0 } && after != before)
    }

    /// SGDW over two steps with Nesterov momentum: the decay is (η_t/η)·λ·p_{t−1}, outside the momentum.
    @Test func decoupledWeightDecayShrinksOutsideTheMomentum() {
        let store = ParameterStore([ParameterSpec(name: "w", shape: [2])])
        let sgd = SGD(parameterCount: 2, momentum: 0.9, weightDecay: 0.01, nesterov: true)
        sgd.decoupledWeightDecay = true
        store.values.pointer.update(from: [1, -2], count: 2)
        let grads: [[Float]] = [[0.5, 0.25], [-1, 0.125]]
        var p: [Float] = [1, -2], b: [Float] = [0, 0]
        for (t, grad) in grads.enumerated() {
            store.gradients.pointer.update(from: grad, count: 2)
            let (lr, factor): (Float, Float) = t == 0 ? (0.1, 1) : (0.05, 0.5)
            sgd.step(store, learningRate: lr, scheduleFactor: factor)
            for i in 0..<2 {
                b[i] = 0.9 * b[i] + grad[i]
                let d = grad[i] + 0.9 * b[i]
                p[i] = p[i] - lr * d - factor * 0.01 * p[i]
            }
            let got = store.copyValues()
            for i in 0..<2 { #expect(abs(got[i] - p[i]) <= 1e-6 * abs(p[i]), "step \(t + 1), parameter \(i): \(got[i]) vs \(p[i])") }
        }
        // Off, the same steps are L2 (the decay inside the gradient): a different result.
        let l2 = SGD(parameterCount: 2, momentum: 0.9, weightDecay: 0.01, nesterov: true)
        store.values.pointer.update(from: [1, -2], count: 2)
        for grad in grads { store.gradients.pointer.update(from: grad, count: 2); l2.step(store, learningRate: 0.1) }
        #expect(store.copyValues() != p)
    }

    /// Linear warm-up over 10 steps, then a straight line from 0.4 down to 0.1 × 0.4 over the remaining 100.
    @Test func linearScheduleValues() {
        var c = TrainingConfig()
        c.schedule = .linear; c.learningRate = 0.4; c.lrFloor = 0.1; c.totalSteps = 110; c.warmupEpochs = 1
        let s = c.learningRateSchedule(stepsPerEpoch: 10)
        for (step, rate) in [(0, 0.04), (9, 0.4), (10, 0.4), (60, 0.22), (85, 0.13), (109, 0.04 + 0.36 * 0.01), (110, 0.04), (500, 0.04)] {
            #expect(abs(Double(s.rate(at: step)) - rate) < 1e-6, "step \(step): \(s.rate(at: step)), want \(rate)")
        }
        // No floor: down to 0 at the end.
        c.lrFloor = nil
        #expect(c.learningRateSchedule(stepsPerEpoch: 10).rate(at: 110) == 0)
    }
}
