import Foundation
import Testing
import SqueezeTestSupport

/// The quick tier (`scripts/test --quick`) leaves out every test that starts a process because such tests
/// start them through `startProcess`, which skips them there. A `Process` run directly would run in the
/// quick tier too: none may be.
@Test func everyTestStartsItsChildProcessesThroughStartProcess() throws {
    let tests = TestInputs.packageRoot + "/Tests"
    let files = try #require(FileManager.default.enumerator(atPath: tests)?.allObjects as? [String])
        .filter { $0.hasSuffix(".swift") && !$0.hasPrefix("SqueezeTestSupport/") }
    let declaration = try Regex(#"(\w+) = Process\(\)"#)
    var processes = 0, direct = [String]()
    for file in files {
        let text = try String(contentsOfFile: tests + "/" + file, encoding: .utf8)
        for match in text.matches(of: declaration) {
            let name = String(text[match.output[1].range!])
            processes += 1
            if text.contains("\(name).run()") { direct.append("\(file): \(name).run()") }
        }
    }
    #expect(processes >= 4, "found \(processes) Process values in \(files.count) files: is the scan still reading Tests/?")
    #expect(direct.isEmpty, "run these with startProcess(_:), so that the quick tier skips their tests: \(direct)")
}
