import Foundation
import Testing
@testable import SqueezeSystem

@Suite("Trace windows and files")
struct TraceUnitTests {
    @Test func windowsParseAndBadOnesNameTheFlag() throws {
        #expect(try TraceWindow(parsing: "3").steps(first: 10) == 11..<14)  // after the warm-up step
        #expect(try TraceWindow(parsing: "4:7").steps(first: 10) == 4..<7)
        for bad in ["0", "-1", "1001", "7:4", "4:4", ":3", "3:", "a", "1:2:3", "0:1001"] {
            #expect(throws: TraceError.self) { try TraceWindow(parsing: bad) }
            do { _ = try TraceWindow(parsing: bad) } catch { #expect(error.description.contains("--trace-steps") && error.description.contains("'\(bad)'")) }
        }
    }

    @Test func onlyTheWindowsStepsAreRecordedAndTheFileReadsBack() throws {
        let path = NSTemporaryDirectory() + "trace-unit-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let tracer = Tracer(path: path, pid: 3, processName: "rank 3", window: try TraceWindow(parsing: "2"))
        for step in 5..<10 {
            tracer.beginStep(step)
            traced(tracer, .compute, "step", "step \(step)", ["step": step]) {
                traced(tracer, .allReduce, "allreduce", "inner", ["bucket": 1]) {}
            }
        }
        tracer.endRecording()
        #expect(tracer.begin() == nil)
        try tracer.write()
        let events = try TraceFile.read(path)
        let complete = events.filter { $0.ph == "X" }
        #expect(complete.filter { $0.tid == TraceTrack.compute.rawValue }.map(\.name) == ["step 6", "step 7"])
        #expect(complete.allSatisfy { $0.pid == 3 && $0.dur! >= 0 })
        #expect(complete.first { $0.name == "inner" }?.args?["bucket"] == .int(1))
        #expect(events.contains { $0.ph == "M" && $0.name == "process_name" && $0.args?["name"] == .string("rank 3") })
    }

    @Test func unwritablePathsAreRefusedUpFront() {
        #expect(throws: TraceError.self) { try TraceFile.checkWritable("/nonexistent-dir-\(getpid())/t.json") }
        #expect(throws: TraceError.self) { try TraceFile.checkWritable(NSTemporaryDirectory()) }
        #expect(throws: Never.self) { try TraceFile.checkWritable(NSTemporaryDirectory() + "t.json") }
    }
}
