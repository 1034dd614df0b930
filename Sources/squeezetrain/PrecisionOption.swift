import ArgumentParser
import Foundation
import SqueezeEngine

extension Precision: ExpressibleByArgument {}

/// `--precision fp32|bf16`, shared by `train`, `eval` and `bench train`.
struct PrecisionOption: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Arithmetic of the convolutions: fp32, or bf16 (autocast-style mixed precision).",
        discussion: "bf16 rounds both inputs of every convolution GEMM to bfloat16 and accumulates in fp32; weights, "
            + "optimizer, BatchNorm, softmax, loss and gradients stay fp32. It needs a CPU with AVX512_BF16; "
            + "without it the run falls back to fp32 with a warning."))
    var precision: Precision = .fp32

    /// The precision to run with on this CPU (warns on standard error when bf16 falls back to fp32).
    func resolved() -> Precision {
        guard precision == .bf16, !CPUFeatures.hasAVX512BF16 else { return precision }
        FileHandleOutput.standardError("squeezetrain: warning: --precision bf16 needs a CPU with AVX512_BF16 "
            + "(this one lacks the avx512_bf16 flag in /proc/cpuinfo, and oneDNN 2.6 has no bf16 GEMM without it); "
            + "running in fp32\n")
        return .fp32
    }
}

/// `SQUEEZETRAIN_CONVOLUTION` (a debugging override, for `train` and `bench train`): `gemm` forces
/// im2col + sgemm, `onednn` (or `direct`) oneDNN's convolution primitives, for every training-mode fp32
/// convolution; unset or `automatic`, the engine picks per layer shape (`ConvolutionAlgorithm`, docs/engine.md).
func convolutionOverride() throws -> ConvolutionAlgorithm {
    let name = "SQUEEZETRAIN_CONVOLUTION"
    guard let value = ProcessInfo.processInfo.environment[name], !value.isEmpty else { return .automatic }
    if value == "direct" { return .onednn }
    guard let algorithm = ConvolutionAlgorithm(rawValue: value) else {
        throw ValidationError("\(name)=\(value) is not an algorithm: use automatic (the default), gemm or onednn, or unset it")
    }
    return algorithm
}
