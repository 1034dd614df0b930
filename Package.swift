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

        // System errors (errno + function), the atomic file write, CPU pinning, a monitor, rate-limited logs.
        .target(name: "SqueezeSystem", dependencies: ["CLinux"], swiftSettings: optimize),

        // Tensors, kernels (forward/backward pairs), layers, models, optimizer, safetensors.
        .target(name: "SqueezeEngine", dependencies: ["CDNNL", "SqueezeSystem"], swiftSettings: optimize),
        // CIFAR-10 reader, augmentation, sharded sampler.
        .target(name: "SqueezeData", dependencies: ["SqueezeEngine"], swiftSettings: optimize),
        // Bytes between processes: the ZeroMQ wrapper, keys, CURVE/ZAP, the sealed data plane, the data-plane
        // and control-plane channels and their in-process twins, the private ipc directory, byte counters.
        .target(name: "SqueezeTransport", dependencies: ["CZeroMQ", "CCrypto", "SqueezeSystem"], swiftSettings: optimize),
        // Ring, star and tree all-reduce over a Transport (one per file), codecs, reduction kernels, the
        // wire header, the traffic theory, the algorithm enum and its factory.
        .target(name: "SqueezeCollectives", dependencies: ["SqueezeTransport", "SqueezeSystem"], swiftSettings: optimize),

        // Deep Compression: pruning, weight sharing (and their retraining), Huffman coding, the .sqz file format.
        .target(name: "SqueezeCompress", dependencies: ["SqueezeEngine", "SqueezeTraining"], swiftSettings: optimize),

        // Single-process training: trainer, checkpoints, metrics, progress.
        .target(name: "SqueezeTraining", dependencies: ["SqueezeSystem", "SqueezeEngine", "SqueezeData"], swiftSettings: optimize),

        // Coordinator, worker loop, launcher.
        .target(name: "SqueezeCluster", dependencies: ["CLinux", "SqueezeEngine", "SqueezeData", "SqueezeTraining", "SqueezeTransport",
                                                      "SqueezeCollectives"],
                swiftSettings: optimize),

        .executableTarget(
            name: "squeezetrain",
            dependencies: [
                "SqueezeEngine", "SqueezeData", "SqueezeTransport", "SqueezeCollectives", "SqueezeTraining", "SqueezeCluster", "SqueezeCompress",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: optimize),

        // What the tests share: their inputs (../shared when present, else committed fixtures and generated
        // CIFAR-10-format files), the tiers, the executable they start, ranks as threads.
        .target(name: "SqueezeTestSupport", dependencies: ["SqueezeEngine", "SqueezeData"], path: "Tests/SqueezeTestSupport"),

        .testTarget(name: "SqueezeSystemTests", dependencies: ["SqueezeSystem"]),
        .testTarget(name: "SqueezeEngineTests", dependencies: ["SqueezeTestSupport", "SqueezeEngine"]),
        .testTarget(name: "SqueezeDataTests", dependencies: ["SqueezeTestSupport", "SqueezeData"]),
        // The seal's tests send collective frames (WireHeader) as an attacker would capture them.
        .testTarget(name: "SqueezeTransportTests", dependencies: ["SqueezeTestSupport", "SqueezeTransport", "SqueezeCollectives"]),
        .testTarget(name: "SqueezeCollectivesTests", dependencies: ["SqueezeTestSupport", "SqueezeCollectives", "SqueezeTransport"]),
        .testTarget(name: "SqueezeCompressTests", dependencies: ["SqueezeTestSupport", "SqueezeCompress", "SqueezeEngine", "SqueezeData", "SqueezeTraining"]),
        .testTarget(name: "SqueezeTrainingTests", dependencies: ["SqueezeTestSupport", "SqueezeTraining"], exclude: ["Fixtures"]),
        .testTarget(name: "SqueezeClusterTests", dependencies: ["SqueezeTestSupport", "SqueezeCluster", "SqueezeTransport", "SqueezeCollectives", "SqueezeEngine", "SqueezeTraining"]),
    ]
)
