import Foundation
import Testing
import SqueezeCollectives
import SqueezeTransport
import SqueezeEngine
@testable import SqueezeCluster

// An attacker on the same machine, against real processes over real sockets: it can reach every
// port but does not hold the run's key. Whatever it sends, the run must end as a clean run does,
// bit for bit.

/// A plain TCP connection to 127.0.0.1:`port` (nil if refused).
func rawConnection(port: Int) -> Int32? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let ok = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    if ok != 0 { close(fd); return nil }
    var nosignal: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &nosignal, socklen_t(MemoryLayout<Int32>.size))
    return fd
}

/// Writes `bytes` to `fd` until done or the peer closes (never raises SIGPIPE).
func rawSend(_ fd: Int32, _ bytes: [UInt8]) {
    var sent = 0
    while sent < bytes.count {
        let n = bytes[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n <= 0 { return }
        sent += n
    }
}

func port(of endpoint: String) -> Int { Int(endpoint.split(separator: ":").last!)! }

/// Attacks on both planes of a run, from a thread of its own, until told to stop.
final class Attacker: @unchecked Sendable {
    // @unchecked Sendable: `lock` guards every field the test reads.
    private let lock = NSLock()
    private var running = true
    private var dataPorts = [Int]()
    private var log = [String]()
    let controlPort: Int
    let seed: UInt64
    private let done = DispatchSemaphore(value: 0)

    init(controlPort: Int, seed: UInt64) { self.controlPort = controlPort; self.seed = seed }

    func addDataPort(_ p: Int) { lock.withLock { if !dataPorts.contains(p) { dataPorts.append(p) } } }
    var actions: [String] { lock.withLock { log } }
    private var isRunning: Bool { lock.withLock { running } }
    private func note(_ s: String) { lock.withLock { log.append(s) } }

    func start() { Thread { self.run(); self.done.signal() }.start() }
    func stop() { lock.withLock { running = false }; done.wait() }

    private func run() {
        var rng = SeededRNG(seed: seed, stream: 0)
        let context = try! ZMQContext()
        defer { context.terminate() }
        var sockets = [ZMQSocket]()
        defer { for s in sockets { s.close() } }
        // Control plane: a plain peer and a CURVE peer with another key speak the protocol.
        let forged: [ControlMessage] = [
            .hello(Hello(protocolVersion: ControlMessage.version, host: "attacker", pid: 666, requestedRank: 0, threads: 1)),
            .failure(Failure(rank: 0, step: 1, message: "forged failure")), .stop(Stop(reason: "forged stop")),
            .heartbeat(Heartbeat(rank: 1, step: 1)),
        ]
        let wrongKey = PeerSecurity.curve(try! RunKey.generate())
        for security in [PeerSecurity.insecure, wrongKey] {
            let s = try! ZMQSocket(context: context, type: .dealer)
            try! s.secureAsClient(security)
            try! s.connect("tcp://127.0.0.1:\(controlPort)")
            for m in forged { _ = m.encoded().withUnsafeBytes { try? s.send($0, dontWait: true) } }
            sockets.append(s)
        }
        note("forged control messages, plain and with another key")
        var attacked = Set<Int>()
        while isRunning {
            // Each data-plane port, once it is known: a plain peer and one with another key, each
            // announcing rank 0's and rank 1's routing id, send well-formed ring frames of 1e30.
            for p in lock.withLock({ dataPorts }) where !attacked.contains(p) {
                attacked.insert(p)
                for security in [PeerSecurity.insecure, wrongKey] {
                    for rank in 0..<2 {
                        let s = try! ZMQSocket(context: context, type: .dealer)
                        try! s.setRoutingID(ZMQTransport.routingID(rank: rank))
                        try! s.secureAsClient(security)
                        try! s.connect("tcp://127.0.0.1:\(p)")
                        var header = [UInt8](repeating: 0, count: WireHeader.size)
                        header.withUnsafeMutableBytes {
                            WireHeader(kind: .reduceScatter, sender: rank, tag: CollectiveTag(step: 3), offset: 0, count: 1024).encode(into: $0)
                        }
                        let payload = [Float](repeating: 1e30, count: 1024).withUnsafeBytes { Array($0) }
                        for _ in 0..<20 {
                            header.withUnsafeBytes { h in _ = try? s.send(h, more: true, dontWait: true) }
                            payload.withUnsafeBytes { b in _ = try? s.send(b, dontWait: true) }
                        }
                        sockets.append(s)
                    }
                }
                // 1 MiB of plain bytes (libzmq would parse them as a legacy peer's frames).
                if let fd = rawConnection(port: p) {
                    rawSend(fd, (0..<(1 << 20)).map { _ in UInt8.random(in: 0...255, using: &rng) })
                    close(fd)
                }
                note("forged data-plane frames and 1 MiB of noise to port \(p)")
            }
            // Fuzz: a mutated ZMTP greeting, then random bytes, to a random port of the run.
            let ports = [controlPort] + lock.withLock { dataPorts }
            let target = ports[Int.random(in: 0..<ports.count, using: &rng)]
            if let fd = rawConnection(port: target) {
                var greeting: [UInt8] = [0xFF] + [UInt8](repeating: 0, count: 8) + [0x7F, 3, 0] + Array("CURVE".utf8)
                greeting += [UInt8](repeating: 0, count: 64 - greeting.count)
                for _ in 0..<Int.random(in: 0...6, using: &rng) { greeting[Int.random(in: 0..<64, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
                rawSend(fd, greeting + (0..<Int.random(in: 0...4096, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
                close(fd)
            }
            usleep(20_000)
        }
        note("fuzzer stopped")
    }
}

/// Peak resident memory (VmHWM) of a process, in bytes.
func peakResidentBytes(pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
          let kb = Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) else { return nil }
    return kb * 1024
}

@Suite("Attacks on a run (real processes, real sockets)", .serialized, .timeLimit(.minutes(10)))
struct AttackTests {
    let common = ["--workers", "2", "--steps", "30", "--batch-size", "32", "--dropout", "0", "--init-weights", goldenWeights,
                  "--lr", "0.01", "--no-eval"]

    func workers(_ endpoint: String, dir: String, tag: String) throws -> [Child] {
        try (0..<2).map { try Child(["worker", "--coordinator", endpoint, "--rank", "\($0)"], log: dir + "/\(tag)-worker\($0).log") }
    }

    /// No key, another key, strangers on both planes, an idle-connection flood, a huge frame and a
    /// seeded fuzzer: nobody joins, nothing stops the run, and its weights equal a clean run's.
    @Test func aRunUnderAttackEndsBitForBitAsACleanRun() throws {
        let dir = try temporaryDirectory("attack")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // The clean run.
        let (clean, cleanEndpoint) = try startCoordinator(common + ["--save-weights", dir + "/clean.safetensors"], in: dir)
        let cleanWorkers = try workers(cleanEndpoint, dir: dir, tag: "clean")
        #expect(clean.wait() == 0, "\(clean.output)")
        for w in cleanWorkers { #expect(w.wait() == 0, "\(w.output)") }

        // The attacked run: 1,100 idle connections before any worker joins.
        try FileManager.default.createDirectory(atPath: dir + "/attacked", withIntermediateDirectories: true)
        let (coordinator, endpoint) = try startCoordinator(common + ["--save-weights", dir + "/attacked.safetensors", "--join-timeout", "60"],
                                                           in: dir + "/attacked")
        let controlPort = port(of: endpoint)
        let idle = (0..<1_100).compactMap { _ in rawConnection(port: controlPort) }
        defer { for fd in idle { close(fd) } }
        #expect(idle.count == 1_100)
        let rssBefore = peakResidentBytes(pid: coordinator.process.processIdentifier) ?? 0
        // 200 MiB in one stream: no frame of it may be buffered.
        if let fd = rawConnection(port: controlPort) {
            var header: [UInt8] = [0xFF] + [UInt8](repeating: 0, count: 8) + [0x7F, 3, 0] + Array("NULL".utf8)
            header += [UInt8](repeating: 0, count: 64 - header.count)
            header += [0x02, 0, 0, 0, 0, 0x0C, 0x80, 0, 0]  // a 200 MiB frame
            rawSend(fd, header)
            let chunk = [UInt8](repeating: 0x41, count: 1 << 20)
            for _ in 0..<200 { rawSend(fd, chunk) }
            close(fd)
        }
        let attacker = Attacker(controlPort: controlPort, seed: 20261201)
        attacker.start()
        let attacked = try workers(endpoint, dir: dir, tag: "attacked")
        // Learn the data-plane ports from the workers' logs as they start.
        let deadline = Date().addingTimeInterval(60)
        var rssAfter = rssBefore
        while coordinator.process.isRunning && Date() < deadline {
            rssAfter = peakResidentBytes(pid: coordinator.process.processIdentifier) ?? rssAfter
            for w in attacked {
                if let range = w.output.range(of: #"data plane tcp://127\.0\.0\.1:\d+"#, options: .regularExpression) {
                    attacker.addDataPort(port(of: String(w.output[range])))
                }
            }
            usleep(100_000)
        }
        let status = coordinator.wait()
        attacker.stop()
        #expect(status == 0, "\(coordinator.output)")
        for w in attacked { #expect(w.wait() == 0, "\(w.output)") }
        #expect(attacker.actions.contains { $0.hasPrefix("forged data-plane frames") }, "\(attacker.actions)")
        let difference = try byteDifference(dir + "/clean.safetensors", dir + "/attacked.safetensors")
        #expect(difference == nil, "the attacked run's weights differ from the clean run's: \(difference ?? "")")
        #expect(coordinator.output.contains("all 2 worker(s) ready"))
        #expect(!coordinator.output.contains("attacker"))  // no rank, no log line of its messages
        #expect(coordinator.output.contains("refused a connection"), "\(coordinator.output)")
        #expect(rssAfter - rssBefore < 64 << 20, "the coordinator's peak RSS grew by \(rssAfter - rssBefore) bytes")
        let lines = coordinator.output.split(separator: "\n").count
        #expect(lines < 200, "\(lines) lines of output: refusals must be logged at a bounded rate")
    }

    /// A worker without the key, or with another one, is refused at the handshake and says so at once.
    @Test func aWorkerWithoutTheKeyIsRefusedAndSaysSo() throws {
        let dir = try temporaryDirectory("wrong-key")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (coordinator, endpoint) = try startCoordinator(["--workers", "1", "--steps", "1", "--batch-size", "8", "--no-eval",
                                                            "--join-timeout", "30"], in: dir)
        let other = dir + "/other.key"
        try RunKey.generate().write(to: other)
        for (flags, tag) in [(["--key-file", other], "other-key"), (["--insecure"], "no-key")] {
            let w = try Child(["worker", "--coordinator", endpoint, "--join-timeout", "20"] + flags, log: dir + "/\(tag).log")
            #expect(w.wait(timeout: 15) != 0)
            #expect(w.output.contains("authentication failed"), "\(tag): \(w.output)")
        }
        #expect(coordinator.process.isRunning)  // still waiting for a real worker
        let real = try Child(["worker", "--coordinator", endpoint], log: dir + "/real.log")
        #expect(real.wait() == 0, "\(real.output)")
        #expect(coordinator.wait() == 0, "\(coordinator.output)")
        #expect(coordinator.output.contains("refused a connection"), "\(coordinator.output)")
    }

    /// Over tcp, a coordinator or worker needs a key or an explicit --insecure.
    @Test func noKeyNoTCPRunWithoutInsecure() throws {
        let dir = try temporaryDirectory("no-key")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let c = try Child(["coordinator", "--bind", "tcp://127.0.0.1:*", "--workers", "1", "--steps", "1"], log: dir + "/c.log",
                          environment: ["SQUEEZETRAIN_KEY_FILE": ""])
        #expect(c.wait() == 1)
        #expect(c.output.contains("this run has no key") && c.output.contains("squeezetrain keygen") && c.output.contains("--insecure"), "\(c.output)")
        let w = try Child(["worker", "--coordinator", "tcp://127.0.0.1:1"], log: dir + "/w.log", environment: ["SQUEEZETRAIN_KEY_FILE": ""])
        #expect(w.wait() == 1)
        #expect(w.output.contains("this run has no key"), "\(w.output)")
        let both = try Child(["worker", "--coordinator", "tcp://127.0.0.1:1", "--insecure", "--key-file", testKeyFile], log: dir + "/b.log")
        #expect(both.wait() != 0 && both.output.contains("--insecure and --key-file contradict"), "\(both.output)")
    }

    /// SIGTERM reaches a coordinator waiting for workers and a worker waiting for a coordinator.
    @Test func aSignalStopsTheRendezvousWithinASecond() throws {
        let dir = try temporaryDirectory("rendezvous-signal")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (c, _) = try startCoordinator(["--workers", "2", "--steps", "1", "--join-timeout", "120"], in: dir)
        let w = try Child(["worker", "--coordinator", "tcp://127.0.0.1:\(try freeTCPPort())", "--join-timeout", "120", "--events"],
                          log: dir + "/w.log")
        // Each says when it takes the signals: the coordinator once listening, the worker once joining.
        #expect(w.waitForEvent(.joining) != nil, "\(w.output)")
        for p in [c, w] { kill(p.process.processIdentifier, SIGTERM) }
        #expect(c.wait(timeout: 5) == 128 + SIGTERM, "\(c.output)")
        #expect(w.wait(timeout: 5) == 128 + SIGTERM, "\(w.output)")
        #expect(c.output.contains("signal 15 while waiting for workers"), "\(c.output)")
        #expect(w.output.contains("signal 15 while waiting for a rank"), "\(w.output)")
    }

    /// SIGTERM to one worker during training: it asks the coordinator to stop, every rank stops after
    /// the same step, rank 0 checkpoints there, and the coordinator says the run is incomplete.
    @Test func aSignalToAWorkerStopsTheRunAtOneStepWithACheckpoint() throws {
        let dir = try temporaryDirectory("worker-signal")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (c, endpoint) = try startCoordinator(["--workers", "2", "--steps", "2000", "--batch-size", "16", "--no-eval",
                                                  "--checkpoint-dir", dir + "/ckpt"], in: dir)
        let w = try workers(endpoint, dir: dir, tag: "signal")
        #expect(c.waitForOutput("all 2 worker(s) ready"), "\(c.output)")
        #expect(w[1].waitForOutput("rank 1 of 2"), "\(w[1].output)")
        kill(w[1].process.processIdentifier, SIGTERM)
        #expect(c.wait(timeout: 60) == 1, "\(c.output)")
        for x in w { #expect(x.wait(timeout: 30) == 0, "\(x.output)") }
        #expect(w[1].output.contains("rank 1: signal 15: asking the coordinator to stop the run"), "\(w[1].output)")
        guard let range = c.output.range(of: #"worker rank 1 asks to stop \(signal 15\): stopping after step (\d+)"#, options: .regularExpression)
        else { Issue.record("no stop line:\n\(c.output)"); return }
        let step = Int(c.output[range].split(separator: " ").last!)!
        #expect(c.output.contains("stopped early after step \(step): worker rank 1 asks to stop"), "\(c.output)")
        #expect(FileManager.default.fileExists(atPath: dir + String(format: "/ckpt/checkpoint-%09d.safetensors", step)))
    }
}
