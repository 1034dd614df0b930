import Testing
import SqueezeSystem

@Test func aFloodOfLogLinesIsBoundedAndCounted() {
    var lines = [String]()
    let log = RateLimitedLog(interval: .seconds(3600)) { lines.append($0) }
    for i in 0..<22_000 { log.line("refused \(i)") }
    #expect(lines == ["refused 0"])
}
