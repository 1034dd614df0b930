import Foundation
import Testing
@testable import SqueezeSystem

@Suite("System errors and atomic writes")
struct SystemTests {
    func temporaryDirectory() throws -> String {
        let dir = NSTemporaryDirectory() + "squeeze-system-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func systemCallRetriesEINTRAndTreatsEAGAINAsNothingToDo() throws {
        var calls = 0
        let rc = try systemCall("fake") { () -> Int32 in
            calls += 1
            if calls < 3 { errno = EINTR; return -1 }
            return 7
        }
        #expect(rc == 7 && calls == 3)
        #expect(try systemCall("fake") { () -> Int32 in errno = EAGAIN; return -1 } == nil)
        let error = #expect(throws: SystemError.self) {
            _ = try systemCall("fake", operation: "read '/x'") { () -> Int32 in errno = ENOENT; return -1 }
        }
        #expect(error?.code == ENOENT && error?.function == "fake")
        #expect(error?.description == "fake (read '/x') failed: \(String(cString: strerror(ENOENT))) (errno \(ENOENT))")
        #expect(throws: SystemError.self) { try systemCallRequired("fake") { () -> Int32 in errno = EAGAIN; return -1 } }
    }

    @Test func atomicWriteReplacesTheFileAndLeavesNoTemporary() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/latest"
        try AtomicFile.write(Array("one\n".utf8), to: path)
        try AtomicFile.write(Array("two\n".utf8), to: path)
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "two\n")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["latest"])
    }

    @Test func aFailedWriteLeavesTheOldFileAndNoTemporary() throws {
        let dir = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/w"
        try AtomicFile.write([1, 2, 3], to: path)
        struct Stop: Error {}
        #expect(throws: Stop.self) {
            try AtomicFile.write(to: path) { file in
                try file.write([9, 9])
                throw Stop()
            }
        }
        #expect(FileManager.default.contents(atPath: path) == Data([1, 2, 3]))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["w"])

        let missing = #expect(throws: SystemError.self) { try AtomicFile.write([1], to: dir + "/no/such/dir/w") }
        #expect(missing?.code == ENOENT && missing?.function == "open")
        #expect(missing?.operation?.hasPrefix("create temporary file '\(dir)/no/such/dir/.w.tmp-") == true)
    }
}
