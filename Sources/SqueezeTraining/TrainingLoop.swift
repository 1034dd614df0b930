import Foundation
import SqueezeData
import SqueezeSystem

/// A request to stop a run at a step boundary. The executable sets it from SIGINT/SIGTERM; a
/// cluster worker sets it when the coordinator says "stop after step S". Thread-safe.
public final class StopToken: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `lock`.
    private let lock = NSLock()
    private var signalNumber: Int32?
    private var step: Int?
    private var why: String?

    public init() {}

    /// Stop at the next step boundary (a signal).
    public func request(signal: Int32) {
        lock.withLock {
            guard why == nil else { return }
            signalNumber = signal; why = "signal \(signal)"
        }
    }

    /// Stop once `afterStep` steps are done (0-based steps 0..<afterStep).
    public func request(afterStep: Int, reason: String) {
        lock.withLock {
            guard why == nil || signalNumber != nil else { return }
            step = afterStep; why = reason
        }
    }

    public var isRequested: Bool { lock.withLock { why != nil } }
    /// The signal that asked for the stop, if one did.
    public var signal: Int32? { lock.withLock { signalNumber } }
    public var reason: String? { lock.withLock { why } }

    /// Where a run that has done `current` steps stops: nil when no stop is requested.
    public func stopStep(current: Int) -> Int? {
        lock.withLock { why == nil ? nil : (step ?? current) }
    }
}

/// When a run writes a checkpoint: at every epoch end, at the end of the run, every `every` steps
/// (0: never in between) and where a stop was requested.
public struct CheckpointPolicy: Sendable {
    public var every: Int
    public init(every: Int = 0) { self.every = every }

    /// Why a checkpoint is due once `step` steps are done, or nil.
    public func reason(step: Int, epochEnded: Bool, finished: Bool, epoch: Int) -> String? {
        if finished { return "end of run" }
        if epochEnded { return "end of epoch \(epoch + 1)" }
        if every > 0 && step % every == 0 { return "every \(every) steps" }
        return nil
    }
}

/// What a run does around each step; `TrainingLoop` decides when.
public protocol TrainingLoopHooks: AnyObject {
    /// Before step `step` (0-based) takes its batch from `loader`.
    func willStep(_ step: Int, loader: BatchLoader)
    /// After the optimizer step: metrics, progress, evaluation at an epoch end.
    func didStep(_ result: StepResult, epochEnded: Bool, loader: BatchLoader) throws
    /// Writes a checkpoint of the trainer's state (`reason` says why; at most once per step).
    func checkpoint(reason: String) throws
    /// After the step's checkpoint, if any: reports, messages (which may request a stop).
    func stepFinished(_ result: StepResult) throws
}

/// The one training loop, used by `train` and by every cluster worker: batches from the
/// prefetching loader, one step each through `reducer` (nil: one process), the hooks, a checkpoint
/// when `policy` says so or a stop is due, and the stop itself.
public struct TrainingLoop {
    public let trainer: Trainer
    public var reducer: GradientReducer?
    public var policy: CheckpointPolicy
    public let stop: StopToken

    public init(trainer: Trainer, reducer: GradientReducer? = nil, policy: CheckpointPolicy, stop: StopToken) {
        self.trainer = trainer; self.reducer = reducer; self.policy = policy; self.stop = stop
    }

    public struct Outcome: Sendable {
        public var stepsRun: Int
        public var finalStep: Int
        /// Why the run stopped before its last step (a signal, the coordinator), if it did.
        public var stoppedEarly: String?
    }

    /// Runs to the end of the run or a stop. With `--ema` the network then holds the averaged weights
    /// (what `--save-weights` writes); the checkpoints, written before, keep the raw ones and the average.
    public func run(_ hooks: TrainingLoopHooks) throws -> Outcome {
        let loader = trainer.makeLoader()
        defer { loader.stop() }
        let firstStep = trainer.step
        var checkpointed = -1
        func checkpoint(_ why: String) throws {
            guard checkpointed != trainer.step else { return }
            checkpointed = trainer.step
            try traced(trainer.tracer, .compute, "checkpoint", "checkpoint (\(why))", ["step": trainer.step - 1]) {  // the step just done
                try hooks.checkpoint(reason: why)
            }
        }
        var stoppedEarly: String?
        let tracer = trainer.tracer
        defer { tracer?.endRecording() }
        while !trainer.isFinished {
            tracer?.beginStep(trainer.step)
            let stepStart = tracer?.begin(), step = trainer.step
            defer { if let stepStart { tracer!.end(stepStart, .compute, "step", "step \(step)", ["step": step]) } }
            hooks.willStep(trainer.step, loader: loader)
            guard let batch = traced(tracer, .compute, "data", "wait for data", ["step": step], { loader.next() }) else { break }
            let r = try trainer.trainStep(batch, reducer: reducer)
            let epochEnded = trainer.step % trainer.stepsPerEpoch == 0 || trainer.isFinished
            try hooks.didStep(r, epochEnded: epochEnded, loader: loader)
            let due = policy.reason(step: trainer.step, epochEnded: epochEnded, finished: trainer.isFinished, epoch: r.epoch)
            if let why = due ?? (stop.stopStep(current: trainer.step) == trainer.step ? stop.reason : nil) { try checkpoint(why) }
            try hooks.stepFinished(r)
            if let at = stop.stopStep(current: trainer.step), trainer.step >= at {
                try checkpoint(stop.reason ?? "stop")
                if !trainer.isFinished { stoppedEarly = stop.reason }
                break
            }
        }
        trainer.average?.adopt(into: trainer.network)
        return Outcome(stepsRun: trainer.step - firstStep, finalStep: trainer.step, stoppedEarly: stoppedEarly)
    }
}
