import Testing
@testable import SqueezeCluster

@Suite("Control protocol")
struct ControlProtocolTests {
    func decode(_ bytes: [UInt8]) throws -> ControlMessage {
        try bytes.withUnsafeBytes { try ControlMessage.decode($0, from: "worker 2 (test)") }
    }

    @Test func roundTrip() throws {
        let m = ControlMessage.heartbeat(Heartbeat(rank: 3, step: 17))
        guard case .heartbeat(let h) = try decode(m.encoded()) else { Issue.record("wrong kind"); return }
        #expect(h.rank == 3 && h.step == 17)
    }

    @Test func rejectsBadFramesNamingThePeer() throws {
        let good = ControlMessage.stop(Stop(reason: "done")).encoded()
        var wrongVersion = good; wrongVersion[4] = 9
        var unknownKind = good; unknownKind[6] = 99
        let truncated = Array(good.dropLast(3))
        var badMagic = good; badMagic[0] = 0
        var badBody = good; badBody[ControlMessage.headerSize] = UInt8(ascii: "[")
        for (frame, words) in [(wrongVersion, "version 9"), (unknownKind, "unknown message kind 99"), (truncated, "truncated"),
                               (badMagic, "bad magic"), (badBody, "does not decode"), (Array(good.prefix(5)), "truncated")] {
            do {
                _ = try decode(frame)
                Issue.record("accepted a bad frame (\(words))")
            } catch let e as ControlError {
                #expect(e.description.contains("worker 2 (test)"))
                #expect(e.description.contains(words), "\(e.description)")
            }
        }
    }
}
