import Foundation
import Testing
import SqueezeData
import SqueezeEngine
@testable import SqueezeTraining

@Suite("Training loop, stop token, metrics lines")
struct TrainingLoopTests {
    @Test func aStopRequestEndsTheRunAtTheNextStepWithACheckpoint() throws {
        let dir = try temporaryDirectory("loop-stop")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let trainer = try Trainer(config: deterministicConfig(steps: 100, batch: 8), trainSet: firstTrainingFile)
        let stop = StopToken()
        stop.request(signal: SIGTERM)
        var options = RunOptions()
        options.checkpointDirectory = dir
        options.quiet = true
        let metrics = MemoryMetrics()
        let summary = try runTraining(trainer, testSet: nil, options: options, stop: stop, metrics: metrics)
        #expect(summary.interruptedBy == SIGTERM && summary.finalStep == 1 && summary.stepsRun == 1)
        #expect(try Checkpoint.load(path: dir + "/checkpoint-000000001.safetensors").step == 1)
        #expect(metrics.lines.count == 1 && metrics.lines[0].hasPrefix("{\"step\":0,\"epoch\":0,\"rank\":0,\"world_size\":1,\"loss\":"))
    }

    @Test func aStopAfterAStepWinsOverNothingAndASignalStopsAtOnce() {
        let t = StopToken()
        #expect(t.stopStep(current: 5) == nil && !t.isRequested)
        t.request(afterStep: 9, reason: "coordinator")
        #expect(t.stopStep(current: 5) == 9 && t.signal == nil && t.reason == "coordinator")
        let s = StopToken()
        s.request(signal: SIGINT)
        #expect(s.stopStep(current: 5) == 5 && s.signal == SIGINT && s.reason == "signal 2")
    }

    @Test func checkpointPolicy() {
        let p = CheckpointPolicy(every: 3)
        #expect(p.reason(step: 6, epochEnded: false, finished: false, epoch: 0) == "every 3 steps")
        #expect(p.reason(step: 7, epochEnded: false, finished: false, epoch: 0) == nil)
        #expect(p.reason(step: 10, epochEnded: true, finished: false, epoch: 1) == "end of epoch 2")
        #expect(p.reason(step: 12, epochEnded: true, finished: true, epoch: 1) == "end of run")
        #expect(CheckpointPolicy().reason(step: 6, epochEnded: false, finished: false, epoch: 0) == nil)
    }

    /// The JSON field names, their order and the number formats other tools read.
    @Test func metricsLinesKeepTheirFieldsAndFormats() {
        let step = TrainStepMetrics(step: 4, epoch: 0, loss: 2.25, accuracy: 0.125, learningRate: 0.05, images: 8,
                                    imagesPerSecond: 123.456789, computeSeconds: 0.5, stepSeconds: 1)
        #expect(MetricsLineEncoder.line(step) == #"{"step":4,"epoch":0,"rank":0,"world_size":1,"loss":2.25,"accuracy":0.125,"#
                + #""learning_rate":0.05,"images":8,"images_per_second":123.457,"compute_seconds":0.5,"step_seconds":1}"#)
        var epoch = TrainEpochMetrics(step: 9, epoch: 1, trainLoss: 1.5, trainAccuracy: 0.5, epochSeconds: 10, dataWaitSeconds: 0.25,
                                      dataLoadSeconds: 2, computeSeconds: 7.5, elapsedSeconds: 21.5, trainMacs: 123_000_000_000)
        #expect(MetricsLineEncoder.line(epoch) == #"{"step":9,"epoch":1,"train_loss":1.5,"train_accuracy":0.5,"epoch_seconds":10,"#
                + #""data_wait_seconds":0.25,"data_load_seconds":2,"compute_seconds":7.5,"elapsed_seconds":21.5,"train_macs":123000000000}"#)
        epoch.testAccuracy = 0.75; epoch.testLoss = 0.8
        #expect(MetricsLineEncoder.line(epoch).hasSuffix(#""train_macs":123000000000,"test_accuracy":0.75,"test_loss":0.8}"#))
        let restart = RestartEvent(restart: 1, process: "worker 1", reason: "worker 1 (pid 7) was killed", failedStep: 33,
                                   resumeStep: 20, recoverySeconds: 0.34)
        #expect(MetricsLineEncoder.line(restart) == #"{"event":"restart","restart":1,"process":"worker 1","#
                + #""reason":"worker 1 (pid 7) was killed","failed_step":33,"resume_step":20,"recovery_seconds":0.34}"#)
        #expect(MetricsLineEncoder.line(ClusterTestMetrics(step: 5, epoch: 0, testAccuracy: 0.5, testImages: 10000,
                                                            elapsedSeconds: 3.25, trainMacs: 4096))
                == #"{"step":5,"epoch":0,"test_accuracy":0.5,"test_images":10000,"elapsed_seconds":3.25,"train_macs":4096}"#)
        // 6 steps of 128 images at 1,000 MACs: 768 images × 3 passes × 1,000.
        #expect(trainingMACs(steps: 6, batchSize: 128, forwardMACs: 1_000) == 2_304_000)
    }
}
