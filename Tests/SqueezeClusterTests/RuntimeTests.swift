import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeSystem
import SqueezeTraining
@testable import SqueezeCluster

// What the executable hands to the libraries, tested in this process: the restart supervisor's
// decisions, the coordinator thread's result, a child process's configuration file, who may connect.

@Suite struct RestartSupervisorTests {
    static let crash = ProcessGroup.Outcome.failed(culprit: "worker 1", description: "worker 1 exited with status 1")

    /// Runs `outcomes` one attempt after another (the last repeats); the attempts' numbers.
    func attempts(_ supervisor: RestartSupervisor, _ outcomes: [ProcessGroup.Outcome],
                  during: (Int) -> Void = { _ in }) -> (outcome: ProcessGroup.Outcome, attempts: [Int]) {
        var seen = [Int]()
        let outcome = supervisor.run { attempt in
            seen.append(attempt)
            during(attempt)
            return outcomes[min(attempt, outcomes.count - 1)]
        }
        return (outcome, seen)
    }

    @Test func aFailureRestartsUntilAnAttemptSucceeds() {
        let supervisor = RestartSupervisor(maxRestarts: 3, metricsPath: nil, log: { _ in })
        let run = attempts(supervisor, [Self.crash, Self.crash, .success])
        #expect(run.outcome == .success && run.attempts == [0, 1, 2])
    }

    @Test func restartsStopAtTheLimitWithTheLastFailure() {
        let supervisor = RestartSupervisor(maxRestarts: 2, metricsPath: nil, log: { _ in })
        let run = attempts(supervisor, [Self.crash])
        #expect(run.outcome == Self.crash && run.attempts == [0, 1, 2])
        #expect(attempts(RestartSupervisor(maxRestarts: 0, metricsPath: nil, log: { _ in }), [Self.crash]).attempts == [0])
    }

    @Test func aSignalOrASuccessIsNeverRestarted() {
        let supervisor = RestartSupervisor(maxRestarts: 5, metricsPath: nil, log: { _ in })
        #expect(attempts(supervisor, [.interrupted(SIGTERM)]).attempts == [0])
        #expect(attempts(supervisor, [.success]).attempts == [0])
        // A failure after the launcher took a signal (the processes it stopped) ends the run too.
        let stopped = attempts(supervisor, [Self.crash]) { _ in supervisor.terminate(SIGINT) }
        #expect(stopped.outcome == Self.crash && stopped.attempts == [0] && supervisor.stopped)
    }

    @Test func aRestartIsRecordedOnceTheClusterIsTrainingAgain() throws {
        let dir = try temporaryDirectory("restart-supervisor")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let metrics = dir + "/metrics.jsonl"
        try Data(#"{"step":7,"rank":0}"#.utf8 + [10]).write(to: URL(fileURLWithPath: metrics))
        let lines = Log()
        let supervisor = RestartSupervisor(maxRestarts: 1, metricsPath: metrics, log: { lines.add($0) })
        let run = attempts(supervisor, [Self.crash, .success]) { attempt in
            if attempt == 0 { supervisor.handle(ClusterEvent(.checkpoint, step: 5)) }
            if attempt == 1 { supervisor.handle(ClusterEvent(.ready, step: 5)) }
        }
        #expect(run.attempts == [0, 1] && supervisor.lastCheckpoint == 5)
        #expect(lines.text.contains("restart 1 of 1: every process restarts from the checkpoint at step 5 (the run had reached step 7)"), "\(lines.text)")
        let text = try String(contentsOfFile: metrics, encoding: .utf8)
        let restart = try #require(text.split(separator: "\n").last.map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? nil)
        #expect(restart["event"] as? String == "restart" && restart["process"] as? String == "worker 1")
        #expect(restart["failed_step"] as? Int == 7 && restart["resume_step"] as? Int == 5 && restart["restart"] as? Int == 1)
    }
}

@Suite struct CoordinatorThreadTests {
    struct Broken: Error, CustomStringConvertible { var description: String { "the control socket is gone" } }

    @Test func aFailedCoordinatorReturnsItsErrorAndSaysSoAtOnce() {
        let told = Log()
        let thread = CoordinatorThread(onFailure: { told.add("\($0)") }) { throw Broken() }
        let result = thread.wait(timeout: .seconds(60))
        guard case .failure(let error)? = result else { Issue.record("expected the coordinator's error, got \(String(describing: result))"); return }
        #expect("\(error)" == "the control socket is gone" && told.text == "the control socket is gone")
    }

    @Test func aFinishedCoordinatorReturnsItsSummary() {
        let summary = ClusterSummary(steps: 3, seconds: 1, imagesPerSecond: 48, perRank: [], theoryBytesPerWorker: 0, theoryBytesPerRank: [],
                                     hubBytesSent: 0, hubBytesReceived: 0)
        let told = Log()
        let thread = CoordinatorThread(onFailure: { told.add("\($0)") }) { summary }
        guard case .success(let got)? = thread.wait(timeout: .seconds(60)) else { Issue.record("no summary"); return }
        #expect(got.steps == 3 && told.text.isEmpty)
    }
}

@Suite struct ProcessConfigurationTests {
    @Test func aCoordinatorsConfigurationSurvivesItsFile() throws {
        let dir = try temporaryDirectory("process-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = TrainingConfig()
        (config.totalSteps, config.labelSmoothing, config.model.batchNorm) = (90, 0.1, true)
        var options = CoordinatorOptions(bind: "ipc:///tmp/x.ipc", workers: 3, config: config)
        (options.compression, options.transport, options.timeout, options.checkpointDirectory) = (.topk(fraction: 0.01), .ipc, .milliseconds(2500), "/ckpt")
        let process = CoordinatorProcess(options: options, access: PeerAccess(keyFile: "/k/run.key"), trace: "/t.json",
                                         traceWindow: try TraceWindow(parsing: "2:4"))
        try ProcessConfigFile.write(process, to: dir + "/coordinator.json")
        let back = try ProcessConfigFile.read(CoordinatorProcess.self, from: dir + "/coordinator.json")
        #expect(back.options.config == config && back.options.compression == .topk(fraction: 0.01) && back.options.transport == .ipc)
        #expect(back.options.timeout == .milliseconds(2500) && back.options.checkpointDirectory == "/ckpt" && back.options.workers == 3)
        #expect(back.access == process.access && back.trace == "/t.json" && back.traceWindow.description == "2:4")
    }

    @Test func aWorkersConfigurationSurvivesItsFile() throws {
        let dir = try temporaryDirectory("process-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = WorkerOptions()
        (options.threads, options.rank, options.data, options.ownPaths) = (2, 1, "/data", OwnPaths(checkpointDirectory: "/ckpt"))
        try ProcessConfigFile.write(WorkerProcess(coordinator: "tcp://10.0.0.1:29500", options: options, access: PeerAccess(insecure: true), cpus: "2,3"),
                                    to: dir + "/worker.json")
        let back = try ProcessConfigFile.read(WorkerProcess.self, from: dir + "/worker.json")
        #expect(back.options.threads == 2 && back.options.rank == 1 && back.options.data == "/data" && back.options.ownPaths == options.ownPaths)
        #expect(back.coordinator == "tcp://10.0.0.1:29500" && back.access.insecure && back.cpus == "2,3")
    }

    @Test func aFileThatIsNotAConfigurationIsRefusedNamingIt() throws {
        let dir = try temporaryDirectory("process-config")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(#"{"coordinator": 3}"#.utf8).write(to: URL(fileURLWithPath: dir + "/bad.json"))
        #expect { try ProcessConfigFile.read(WorkerProcess.self, from: dir + "/bad.json") } throws: {
            "\($0)".contains("--config \(dir)/bad.json is not a WorkerProcess")
        }
    }
}

@Suite struct PeerAccessTests {
    @Test func aNetworkEndpointWithoutAKeyIsRefusedWithTheFix() {
        #expect { try PeerAccess().security(endpoint: "tcp://10.0.0.1:29500") } throws: {
            "\($0)".contains("tcp://10.0.0.1:29500 is a network endpoint, and this run has no key") && "\($0)".contains("--key-file")
        }
        #expect((try? PeerAccess(insecure: true).security(endpoint: "tcp://10.0.0.1:29500")) == .insecure)
    }

    @Test func aPrivateIPCRunWithoutAKeyMayNotPutItsDataPlaneOnTCP() throws {
        let endpoint = try ipcEndpoint("runtime-test")
        #expect((try? PeerAccess().security(endpoint: endpoint, transport: .ipc)) == .privateIPC)
        #expect { try PeerAccess().security(endpoint: endpoint, transport: .tcp) } throws: { "\($0)".contains("--transport tcp") }
    }
}
