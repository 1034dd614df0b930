import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeTraining
@testable import SqueezeCluster

// Holes closed after reading the code as an attacker (issue 30): a key-less run only over this
// user's private ipc sockets, no file paths from an unauthenticated network, private temporary
// directories, a refused resume below the checkpoint, bench participants that need their key.

/// No key in the environment: the child decides from its flags alone.
let noKey = ["SQUEEZETRAIN_KEY_FILE": ""]

@Suite("Hardening (real processes)", .serialized)
struct HardeningTests {
    let tiny = ["--steps", "1", "--batch-size", "8", "--no-eval"]

    /// A key-less run exists only when every socket is an ipc socket in the private directory; anything
    /// else is refused naming the socket and the fixes.
    @Test func aKeylessRunNeedsEveryIPCSocketInThePrivateDirectory() throws {
        let dir = try temporaryDirectory("keyless")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let privateDir = try privateSocketDirectory()
        let outside = "ipc://\(dir)/x.ipc", abstract = "ipc://@squeezetrain-test-\(getpid())"
        let inside = "ipc://\(privateDir)/test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).ipc"
        let refusals: [([String], String)] = [
            (["coordinator", "--bind", outside, "--workers", "1", "--transport", "ipc", "--join-timeout", "5"] + tiny, outside),
            (["coordinator", "--bind", abstract, "--workers", "1", "--transport", "ipc", "--join-timeout", "5"] + tiny, abstract),
            (["coordinator", "--bind", inside, "--workers", "1", "--join-timeout", "5"] + tiny, "--transport tcp"),  // tcp data plane
            (["worker", "--coordinator", outside, "--join-timeout", "5"], outside),
            (["worker", "--coordinator", abstract, "--join-timeout", "5"], abstract),
        ]
        for (i, (arguments, named)) in refusals.enumerated() {
            let c = try Child(arguments, log: dir + "/refused-\(i).log", environment: noKey)
            #expect(c.wait(timeout: 30) == 1, "\(arguments): \(c.output)")
            #expect(c.output.contains(named) && c.output.contains("--key-file") && c.output.contains("--insecure"), "\(arguments): \(c.output)")
            #expect(!c.output.contains("warning: --insecure"), "\(arguments): \(c.output)")
        }

        // The reproduction: an ipc control endpoint whose coordinator (here explicitly --insecure) asks for a
        // tcp data plane. A worker without key and without --insecure refuses to listen on tcp.
        let c = try Child(["coordinator", "--bind", inside, "--workers", "1", "--insecure", "--join-timeout", "20", "--events"] + tiny,
                          log: dir + "/insecure-coordinator.log", environment: noKey)
        #expect(c.waitForEvent(.listening) != nil, "\(c.output)")
        let w = try Child(["worker", "--coordinator", inside, "--join-timeout", "20"], log: dir + "/tcp-worker.log", environment: noKey)
        #expect(w.wait(timeout: 60) == 1, "\(w.output)")
        #expect(w.output.contains("tcp") && w.output.contains("--key-file") && w.output.contains("--insecure"), "\(w.output)")
        #expect(!w.output.contains("data plane tcp://"), "\(w.output)")
        c.wait(timeout: 60)

        // Every socket private: the key-less run trains, and nobody claims --insecure.
        let ok = try Child(["coordinator", "--bind", inside, "--workers", "1", "--transport", "ipc", "--events"] + tiny,
                           log: dir + "/ok-coordinator.log", environment: noKey)
        #expect(ok.waitForEvent(.listening) != nil, "\(ok.output)")
        let okWorker = try Child(["worker", "--coordinator", inside], log: dir + "/ok-worker.log", environment: noKey)
        #expect(ok.wait() == 0, "\(ok.output)")
        #expect(okWorker.wait() == 0, "\(okWorker.output)")
        for p in [ok, okWorker] { #expect(!p.output.contains("--insecure"), "\(p.output)") }
        #expect(okWorker.output.contains("data plane ipc://\(privateDir)/"), "\(okWorker.output)")
    }

    /// Without authentication a worker writes and reads no file whose path came over the network; paths
    /// it was given on its own command line, equal to the coordinator's, are used.
    @Test func anUnauthenticatedWorkerTakesNoFilePathsFromTheNetwork() throws {
        let dir = try temporaryDirectory("insecure-paths")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let target = dir + "/victim.safetensors", checkpoints = dir + "/ckpt"
        try Data("the victim's file".utf8).write(to: URL(fileURLWithPath: target))
        for (flag, path) in [("--save-weights", target), ("--checkpoint-dir", checkpoints)] {
            let (c, endpoint) = try startCoordinator(["--workers", "1", "--insecure", "--join-timeout", "30", flag, path] + tiny,
                                                     in: dir, environment: noKey)
            let w = try Child(["worker", "--coordinator", endpoint, "--insecure"], log: dir + "/w\(flag).log", environment: noKey)
            #expect(w.wait() == 1, "\(flag): \(w.output)")
            #expect(w.output.contains(flag) && w.output.contains(path) && w.output.contains("--key-file"), "\(flag): \(w.output)")
            c.wait()
        }
        #expect(try String(contentsOfFile: target, encoding: .utf8) == "the victim's file")
        #expect(Checkpoint.files(in: checkpoints).isEmpty)

        // The worker's own flags, equal to the coordinator's: used.
        let own = ["--save-weights", dir + "/final.safetensors", "--checkpoint-dir", checkpoints]
        let (c, endpoint) = try startCoordinator(["--workers", "1", "--insecure"] + own + tiny, in: dir, environment: noKey)
        let w = try Child(["worker", "--coordinator", endpoint, "--insecure"] + own, log: dir + "/w-own.log", environment: noKey)
        #expect(c.wait() == 0, "\(c.output)")
        #expect(w.wait() == 0, "\(w.output)")
        #expect(FileManager.default.fileExists(atPath: dir + "/final.safetensors"))
        #expect(Checkpoint.files(in: checkpoints).count == 1)
    }

    /// `bench cluster`'s working directory is fresh and private: a random name, mode 0700.
    @Test func benchClusterWorksInAFreshPrivateDirectory() throws {
        let dir = try temporaryDirectory("bench-tmp")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tmp = dir + "/tmp"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        let b = try Child(["bench", "cluster", "--workers", "1", "--steps", "1", "--warmup", "0", "--batch-size", "8", "--json"],
                          log: dir + "/bench.log", environment: ["TMPDIR": tmp + "/"])
        var seen = [String: mode_t]()
        while b.process.isRunning {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [] where name.contains("bench-cluster") {
                var info = stat()
                if lstat(tmp + "/" + name, &info) == 0 { seen[name] = info.st_mode }
            }
            usleep(20_000)
        }
        #expect(b.wait() == 0, "\(b.output)")
        #expect(!seen.isEmpty, "no bench-cluster directory appeared in \(tmp)")
        for (name, mode) in seen {
            #expect(mode & S_IFMT == S_IFDIR && mode & 0o777 == 0o700, "\(name): mode \(String(mode & 0o7777, radix: 8))")
            #expect(!name.hasSuffix("-\(b.process.processIdentifier)"), "\(name): a predictable name")
        }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? []).allSatisfy { !$0.contains("bench-cluster") })
    }

    /// `--resume` with `--steps` below the checkpoint's step: an error naming both numbers, not a trap.
    @Test func resumingBelowTheCheckpointsStepNamesBothNumbers() throws {
        let dir = try temporaryDirectory("resume-below")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ckpt = ["--checkpoint-dir", dir + "/ckpt", "--batch-size", "8", "--no-eval"]
        let (c, endpoint) = try startCoordinator(["--workers", "1", "--steps", "3"] + ckpt, in: dir)
        let w = try Child(["worker", "--coordinator", endpoint], log: dir + "/w.log")
        #expect(c.wait() == 0, "\(c.output)")
        #expect(w.wait() == 0, "\(w.output)")
        let again = try Child(["coordinator", "--bind", "tcp://127.0.0.1:*", "--workers", "1", "--steps", "2", "--resume",
                               "--join-timeout", "5"] + ckpt, log: dir + "/again.log")
        #expect(again.wait() == 1, "\(again.output)")
        #expect(again.output.contains("--steps 2") && again.output.contains("step 3"), "\(again.output)")
    }

    /// `bench allreduce` runs the local default (ipc, nothing sealed, as launch) unless told `--transport tcp`,
    /// and says what ran and what protects the frames: sealed over tcp with its run key, nothing on ipc or
    /// with --insecure, CURVE when asked; the gradient bytes are the theory's whatever the protection.
    @Test(arguments: [([String](), "ipc", "none"), (["--transport", "tcp"], "tcp", "aes-gcm"), (["--transport", "ipc"], "ipc", "none"),
                      (["--transport", "tcp", "--insecure"], "tcp", "none"), (["--transport", "tcp", "--curve-data-plane"], "tcp", "curve")])
    func benchAllreduceReportsItsProtection(flags: [String], transport: String, protection: String) throws {
        let dir = try temporaryDirectory("bench-protection")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let b = try Child(["bench", "allreduce", "--workers", "2", "--floats", "1000", "--iterations", "2", "--warmup", "0",
                           "--bind-to", "none", "--json"] + flags, log: dir + "/b.log")
        #expect(b.wait(timeout: 60) == 0, "\(b.output)")
        let text = b.output.drop { $0 != "{" }  // the JSON object, pretty-printed
        let json = try #require(try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "\(b.output)")
        #expect(json["transport"] as? String == transport, "\(b.output)")
        #expect(json["protection"] as? String == protection, "\(b.output)")
        #expect(json["encrypted"] as? Bool == (protection != "none"), "\(b.output)")
        #expect(json["bytes_sent_per_worker"] as? Int == 4000, "\(b.output)")  // 2(N−1)/N × 4 bytes × 1,000 floats
        #expect((json["seal_gbps"] as? Double ?? 0) > 0, "\(b.output)")
    }

    /// A bench participant started without its key (or --insecure) refuses instead of running in the clear.
    @Test func aBenchParticipantWithoutItsKeyRefuses() throws {
        let dir = try temporaryDirectory("bench-participant")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let p = try Child(["bench", "allreduce", "--workers", "1", "--floats", "16", "--iterations", "1", "--warmup", "0",
                           "--rank", "0", "--endpoints", "tcp://127.0.0.1:\(try freeTCPPort())"], log: dir + "/p.log", environment: noKey)
        #expect(p.wait(timeout: 30) == 1, "\(p.output)")
        #expect(p.output.contains("--key-file") && p.output.contains("--insecure"), "\(p.output)")
        #expect(!p.output.contains("\"encrypted\":false"), "\(p.output)")
    }

    /// A bench participant with its key but tcp endpoints and no `--transport tcp` would run the unsealed
    /// ipc default over tcp: it refuses, naming the endpoint and the flag.
    @Test func aBenchParticipantRefusesTCPEndpointsUnderTheIPCDefault() throws {
        let dir = try temporaryDirectory("bench-participant-tcp")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let key = dir + "/run.key"
        try RunKey.generate().write(to: key)
        let endpoint = "tcp://127.0.0.1:\(try freeTCPPort())"
        let p = try Child(["bench", "allreduce", "--workers", "1", "--floats", "16", "--iterations", "1", "--warmup", "0",
                           "--rank", "0", "--endpoints", endpoint, "--key-file", key], log: dir + "/p.log")
        #expect(p.wait(timeout: 30) == 1, "\(p.output)")
        #expect(p.output.contains(endpoint) && p.output.contains("--transport tcp"), "\(p.output)")
        #expect(!p.output.contains("\"encrypted\""), "\(p.output)")
    }
}
