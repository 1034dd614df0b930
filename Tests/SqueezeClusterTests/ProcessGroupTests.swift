import Foundation
import Testing
@testable import SqueezeCluster

/// Collects a group's output lines.
final class Lines: @unchecked Sendable {
    private let lock = NSLock()
    private var text = ""
    func add(_ s: String) { lock.withLock { text += s } }
    var all: [String] { lock.withLock { text.split(separator: "\n").map(String.init) } }
}

final class EventList: @unchecked Sendable {
    private let lock = NSLock()
    private var items = [(String, ClusterEvent)]()
    func add(_ name: String, _ e: ClusterEvent) { lock.withLock { items.append((name, e)) } }
    var all: [(String, ClusterEvent)] { lock.withLock { items } }
}

func shell(_ name: String, _ script: String) -> ProcessSpec { ProcessSpec(name: name, executable: "/bin/sh", arguments: ["-c", script]) }

@Suite("Process group (launch)", .timeLimit(.minutes(10)))
struct ProcessGroupTests {
    @Test func everyLineIsPrefixedAndWhole() throws {
        let lines = Lines()
        let group = ProcessGroup([shell("a", "i=0; while [ $i -lt 300 ]; do echo line-a-$i; i=$((i+1)); done"),
                                  shell("b", "i=0; while [ $i -lt 300 ]; do echo line-b-$i; echo err-b-$i >&2; i=$((i+1)); done")],
                                 write: lines.add)
        try group.start()
        #expect(group.wait() == .success)
        let out = lines.all
        #expect(out.filter { $0.hasPrefix("[a] line-a-") }.count == 300)
        #expect(out.filter { $0.hasPrefix("[b] line-b-") }.count == 300)
        #expect(out.filter { $0.hasPrefix("[b] err-b-") }.count == 300)
        #expect(out.allSatisfy { $0.range(of: #"^\[(a|b)\] (line|err)-[ab]-\d+$"#, options: .regularExpression) != nil })
        let a = out.filter { $0.hasPrefix("[a]") }.map { Int($0.split(separator: "-").last!)! }
        #expect(a == Array(0..<300))
    }

    @Test func aFailureNamesTheCulpritAndStopsTheOthers() throws {
        let group = ProcessGroup([shell("coordinator", "sleep 30"), shell("worker 1", "sleep 0.3; exit 3")], write: { _ in })
        try group.start()
        guard case .failed(let culprit, let description) = group.wait(gracePeriod: .seconds(5)) else { Issue.record("no failure"); return }
        #expect(culprit == "worker 1")
        #expect(description.contains("worker 1 (pid") && description.contains("exited with status 3"))
    }

    @Test func aKilledProcessIsReportedAndStubbornOnesAreKilled() throws {
        let group = ProcessGroup([shell("stubborn", "trap '' TERM; sleep 30"), shell("victim", "kill -9 $$")], write: { _ in })
        try group.start()
        let outcome = group.wait(gracePeriod: .seconds(1))
        #expect(outcome == .failed(culprit: "victim", description: outcome.description))
        #expect(outcome.description.contains("killed by signal 9 (SIGKILL)"))
    }

    @Test func terminateStopsEverything() throws {
        let group = ProcessGroup([shell("a", "sleep 30"), shell("b", "sleep 30")], write: { _ in })
        try group.start()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { group.terminate() }
        #expect(group.wait(gracePeriod: .seconds(5)) == .interrupted(SIGTERM))
    }

    @Test func primarySuccessEndsTheGroup() throws {
        let lines = Lines()
        let group = ProcessGroup([shell("coordinator", "echo done"), shell("worker 0", "sleep 30")], write: lines.add)
        try group.start()
        #expect(group.wait(primary: "coordinator", gracePeriod: .milliseconds(300)) == .success)
        #expect(lines.all.contains("[launch] stopping worker 0 after coordinator finished"))
    }

    @Test func eventLinesGoToTheirHandlerNotTheOutput() throws {
        let lines = Lines(), events = EventList()
        let line = ClusterEvent(.ready, step: 3, workers: 2).line
        let group = ProcessGroup([shell("coordinator", "echo before; echo '\(line)'; echo after")], write: lines.add,
                                 onEvent: { events.add($0, $1) })
        try group.start()
        #expect(group.wait() == .success)
        #expect(lines.all == ["[coordinator] before", "[coordinator] after"])
        #expect(events.all.map(\.0) == ["coordinator"] && events.all.map(\.1) == [ClusterEvent(.ready, step: 3, workers: 2)])
    }

    @Test func aMissingExecutableIsAClearError() {
        let group = ProcessGroup([ProcessSpec(name: "ghost", executable: "/nonexistent/squeezetrain", arguments: [])])
        #expect { try group.start() } throws: { String(describing: $0).contains("cannot start ghost (/nonexistent/squeezetrain)") }
    }

    @Test func freePortsCanBeBound() throws {
        let port = try freeTCPPort()
        #expect((1...65535).contains(port))
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET); a.sin_port = UInt16(port).bigEndian; a.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        #expect(rc == 0)
    }
}
