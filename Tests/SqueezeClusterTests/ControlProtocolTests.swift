import Testing
import SqueezeCollectives
import SqueezeTraining
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

    /// `tree` travels as its name; an algorithm this build does not know (as `tree` is to a build older than
    /// it) is refused naming the value, so no protocol version bump was needed for it.
    @Test func anAlgorithmTravelsByNameAndAnUnknownOneIsRefusedNamingIt() throws {
        let welcome = ControlMessage.welcome(Welcome(
            rank: 1, worldSize: 3, config: TrainingConfig(), algorithm: .tree, compression: .int8, bucketBytes: 1 << 20, chunkBytes: 1 << 20, transport: .tcp,
            timeoutSeconds: 10, parametersChecksum: "0", initWeights: nil, saveWeights: nil, evaluate: false,
            checkpointDirectory: nil, checkpointEvery: 0, keepCheckpoints: 3, resumeFrom: nil)).encoded()
        guard case .welcome(let w) = try decode(welcome) else { Issue.record("wrong kind"); return }
        #expect(w.algorithm == .tree && w.compression == .int8)
        let field = Array("\"algorithm\":\"tree\"".utf8)
        let at = try #require((0...(welcome.count - field.count)).first { Array(welcome[$0..<$0 + field.count]) == field })
        var unknown = welcome
        unknown.replaceSubrange(at + field.count - 5..<at + field.count - 1, with: Array("fans".utf8))  // same length
        do {
            _ = try decode(unknown)
            Issue.record("accepted an unknown algorithm")
        } catch let e as ControlError {
            #expect(e.description.contains("welcome message body does not decode") && e.description.contains("fans"), "\(e.description)")
        }
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
