import Testing
@testable import SqueezeTransport

@Suite struct EndpointTests {
    @Test func goodEndpointsParse() throws {
        let t = try Endpoint("tcp://10.0.0.1:29500", flag: "--bind")
        #expect(t.kind == .tcp && t.host == "10.0.0.1" && t.port == 29500)
        #expect(try Endpoint("tcp://[::1]:65535", flag: "--bind").port == 65535)
        #expect(try Endpoint("tcp://*:1", flag: "--bind").host == "*")
        #expect(try Endpoint("tcp://node-3.cluster.local:*", flag: "--bind").port == nil)
        #expect(try Endpoint("ipc:///tmp/run/control.ipc", flag: "--bind").path == "/tmp/run/control.ipc")
    }

    @Test(arguments: ["tcp://h:99999", "tcp://h:0", "tcp://h:-1", "tcp://h:+80", "tcp://h:", "tcp://h", "tcp://:80",
                      "http://h:80", "h:80", "ipc://", "tcp://[::1:80", "tcp://a b:80", "tcp://h:80:80"])
    func badEndpointsAreRefusedNamingTheFlag(text: String) {
        #expect(throws: EndpointError.self) { try Endpoint(text, flag: "--coordinator") }
        do { _ = try Endpoint(text, flag: "--coordinator") } catch {
            #expect(error.description.hasPrefix("--coordinator \(text): "), "\(error)")
        }
    }
}
