import ArgumentParser
import Foundation
import SqueezeCluster

struct Launch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a coordinator and N workers as separate processes on this machine (like torchrun --nproc-per-node).",
        discussion: """
        Each process's lines are prefixed with its role and rank. Ctrl-C or SIGTERM stops all of them; \
        if any process fails, the others are stopped and the exit status is non-zero, naming the culprit.
        """)

    @Option(help: "Worker processes.") var workers = 2
    @Option(help: "Compute threads per worker.") var threads = 1
    @Option(help: "Coordinator port (default: a free one).") var port: Int?
    @Option(help: "Address the coordinator binds and workers connect to.") var host = "127.0.0.1"
    @OptionGroup var training: TrainingOptions
    @OptionGroup var communication: ClusterOptions
    @Option(help: "Write JSON lines here: one per worker per step.") var metrics: String?
    @Option(help: "Initial weights for every worker (safetensors).") var initWeights: String?
    @Option(help: "Rank 0 writes the final weights here.") var saveWeights: String?

    func validate() throws {
        guard workers >= 1 else { throw ValidationError("--workers must be at least 1") }
        guard threads >= 1 else { throw ValidationError("--threads must be at least 1") }
        guard training.batchSize % workers == 0 else {
            throw ValidationError("--batch-size \(training.batchSize) is the global batch; it must divide evenly over --workers \(workers)")
        }
    }

    func run() throws {
        do {
            let group = ProcessGroup(try specs())
            let forwarder = SignalForwarder { group.terminate(signal: $0) }
            try group.start()
            let outcome = group.wait(primary: "coordinator")
            withExtendedLifetime(forwarder) {}
            guard outcome == .success else { throw fail("launch: \(outcome)", code: outcome.exitCode) }
        } catch let e as ExitCode {
            throw e
        } catch {
            throw fail(String(describing: error))
        }
    }

    func specs() throws -> [ProcessSpec] {
        let endpoint = "tcp://\(host):\(try port ?? freeTCPPort(host: host))"
        let exe = selfExecutable()
        var coordinator = ["coordinator", "--bind", endpoint, "--workers", "\(workers)"] + training.arguments + communication.arguments
        if let metrics { coordinator += ["--metrics", absolutePath(metrics)] }
        if let initWeights { coordinator += ["--init-weights", absolutePath(initWeights)] }
        if let saveWeights { coordinator += ["--save-weights", absolutePath(saveWeights)] }
        var all = [ProcessSpec(name: "coordinator", executable: exe, arguments: coordinator)]
        for r in 0..<workers {
            var args = ["worker", "--coordinator", endpoint, "--rank", "\(r)", "--threads", "\(threads)",
                        "--join-timeout", "\(communication.joinTimeout)"]
            if let data = training.data { args += ["--data", data] }
            all.append(ProcessSpec(name: "worker \(r)", executable: exe, arguments: args))
        }
        return all
    }
}
