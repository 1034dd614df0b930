// swift-tools-version:6.0
import PackageDescription

// Every target keeps Swift's checks (no -Ounchecked): a failed precondition or an out-of-range
// index traps instead of becoming undefined behaviour. The engine measured no faster with
// -Ounchecked (`bench train`, see docs/engine.md), so it keeps them too.
let optimize: [SwiftSetting] = [.unsafeFlags(["-wmo"], .when(configuration: .release))]

let package = Package(
    name: "squeezetrain",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "squeezetrain", targets: ["squeezetrain"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // System libraries from Debian (installed by scripts/bootstrap).
        .systemLibrary(name: "CDNNL", path: "Sources/CDNNL", providers: [.apt(["libdnnl-dev"])]),
        .systemLibrary(name: "CZeroMQ", path: "Sources/CZeroMQ", pkgConfig: "libzmq", providers: [.apt(["libzmq3-dev"])]),
        // OpenSSL's libcrypto: AES-256-GCM and HKDF for the data plane's sealed frames.
        .systemLibrary(name: "CCrypto", path: "Sources/CCrypto", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),
        // Linux system calls Swift's Glibc module leaves out (CPU affinity).
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),

        // System errors (errno + function) and the atomic file write; no dependencies.
        .target(name: "SqueezeSystem", swiftSettings: optimize),

        // Tensors, kernels (forward/backward pairs), layers, models, optimizer, safetensors.
        .target(name: "SqueezeEngine", dependencies: ["CDNNL", "SqueezeSystem"], swiftSettings: optimize),
        // CIFAR-10 reader, augmentation, sharded sampler.
        .target(name: "SqueezeData", dependencies: ["SqueezeEngine"], swiftSettings: optimize),
        // ZeroMQ wrapper, transports, wire protocol, all-reduce algorithms, byte counters.
        .target(name: "SqueezeComm", dependencies: ["CZeroMQ", "CCrypto", "CLinux", "SqueezeSystem"], swiftSettings: optimize),

        // Deep Compression: pruning, weight sharing (and their retraining), Huffman coding, the .sqz file format.
        .target(name: "SqueezeCompress", dependencies: ["SqueezeEngine", "SqueezeTraining"], swiftSettings: optimize),

        // Single-process training: trainer, checkpoints, metrics, progress.
        .target(name: "SqueezeTraining", dependencies: ["SqueezeSystem", "SqueezeEngine", "SqueezeData"], swiftSettings: optimize),

        // Coordinator, worker loop, launcher.
        .target(name: "SqueezeCluster", dependencies: ["CLinux", "SqueezeEngine", "SqueezeData", "SqueezeTraining", "SqueezeComm"],
                swiftSettings: optimize),

        .executableTarget(
            name: "squeezetrain",
            dependencies: [
                "SqueezeEngine", "SqueezeData", "SqueezeComm", "SqueezeTraining", "SqueezeCluster", "SqueezeCompress",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: optimize),

        // What the tests share: their inputs (../shared when present, else committed fixtures and generated
        // CIFAR-10-format files), the tiers, the executable they start.
        .target(name: "SqueezeTestSupport", dependencies: ["SqueezeEngine", "SqueezeData"], path: "Tests/SqueezeTestSupport"),

        .testTarget(name: "SqueezeSystemTests", dependencies: ["SqueezeSystem"]),
        .testTarget(name: "SqueezeEngineTests", dependencies: ["SqueezeTestSupport", "SqueezeEngine"]),
        .testTarget(name: "SqueezeDataTests", dependencies: ["SqueezeTestSupport", "SqueezeData"]),
        .testTarget(name: "SqueezeCommTests", dependencies: ["SqueezeComm"]),
        .testTarget(name: "SqueezeCompressTests", dependencies: ["SqueezeTestSupport", "SqueezeCompress", "SqueezeEngine", "SqueezeData", "SqueezeTraining"]),
        .testTarget(name: "SqueezeTrainingTests", dependencies: ["SqueezeTestSupport", "SqueezeTraining"], exclude: ["Fixtures"]),
        .testTarget(name: "SqueezeClusterTests", dependencies: ["SqueezeTestSupport", "SqueezeCluster", "SqueezeComm", "SqueezeEngine", "SqueezeTraining"]),
    ]
)
