// Where the tests' inputs come from: ../shared beside the checkout when it is there (as in CI), else the
// fixtures committed under Tests/Fixtures and CIFAR-10-format files generated here.
import Foundation
import Testing
import SqueezeData
import SqueezeEngine

public enum TestInputs {
    /// The package root: this file is <root>/Tests/SqueezeTestSupport/TestInputs.swift.
    public static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    /// Small committed inputs (Tests/Fixtures/README.md).
    public static let fixtures = packageRoot + "/Tests/Fixtures"
    /// `shared/` beside the checkout: CIFAR-10 and PyTorch's reference, when the machine has them.
    public static let shared = (packageRoot as NSString).deletingLastPathComponent + "/shared"

    /// The real CIFAR-10 ($CIFAR10_DIR, data/ or ../shared/data/cifar-10-batches-bin, as squeezetrain looks),
    /// when all six files are there at their real size (10,000 records each); else nil.
    public static let realCIFAR10: String? = {
        guard let dir = try? CIFAR10.resolveDirectory(explicit: nil, base: packageRoot) else { return nil }
        let files = (1...5).map { "data_batch_\($0).bin" } + ["test_batch.bin"]
        let whole = files.allSatisfy {
            (try? FileManager.default.attributesOfItem(atPath: dir + "/" + $0)[.size] as? Int) == 10_000 * SyntheticCIFAR10.recordBytes
        }
        return whole ? dir : nil
    }()

    /// PyTorch's reference tensors (../shared/reference/squeezenet_cifar_golden, written by make_golden.py), or nil.
    public static let pytorchReference: String? = {
        let dir = shared + "/reference/squeezenet_cifar_golden"
        return ["init", "batch", "expected"].allSatisfy { FileManager.default.fileExists(atPath: "\(dir)/\($0).safetensors") } ? dir : nil
    }()

    /// A private directory for generated inputs, removed when the test process ends.
    static let generated: Result<String, Error> = Result {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("squeezetrain-test-inputs-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        atexit { if case .success(let d) = TestInputs.generated { try? FileManager.default.removeItem(atPath: d) } }
        return dir
    }

    /// The CIFAR-10 directory tests (and the processes they start) train on: the real one when present, else
    /// `SyntheticCIFAR10.writeDirectory`'s, written once per test process. If it cannot be written, a path
    /// that says why, which every test using it then reports.
    public static let cifar10: String = realCIFAR10 ?? {
        do {
            let dir = try generated.get() + "/cifar-10-batches-bin"
            try SyntheticCIFAR10.writeDirectory(dir)
            return dir
        } catch {
            return "/nonexistent/could not write synthetic CIFAR-10: \(error)"
        }
    }()

    /// The weights every process of a test starts from: PyTorch's reference initial weights when present,
    /// else squeezenet1_1 (CIFAR stem, 10 classes) initialised with seed 0, written once per test process.
    public static let initialWeights: String = pytorchReference.map { $0 + "/init.safetensors" } ?? {
        do {
            let path = try generated.get() + "/init.safetensors"
            try Network(config: ModelConfig(), seed: 0).saveWeights(to: path)
            return path
        } catch {
            return "/nonexistent/could not write initial weights: \(error)"
        }
    }()
}

/// Tests that compare against the real data set or PyTorch's full reference are reported as skipped, with
/// the reason, where those are absent; CI has them (../shared) and runs them all.
extension Trait where Self == ConditionTrait {
    public static var needsRealCIFAR10: Self {
        .enabled(if: TestInputs.realCIFAR10 != nil,
                 "needs the real CIFAR-10: $CIFAR10_DIR, data/ or ../shared/data/cifar-10-batches-bin (scripts/get-cifar10)")
    }

    public static var needsPyTorchReference: Self {
        .enabled(if: TestInputs.pytorchReference != nil,
                 "needs PyTorch's reference in ../shared/reference/squeezenet_cifar_golden beside the checkout")
    }
}
