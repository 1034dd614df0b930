/// A layer: a forward/backward pair over channel-major tensors (see `Shape`), or in a training step
/// over oneDNN's blocked layout where the layer takes it (convolutions, Fire, max-pool; Blocked.swift).
///
/// Layers own their outputs and input gradients (workspaces reused across steps) and keep what the
/// backward pass needs from the last training-mode forward pass. An eval-mode forward keeps nothing:
/// its outputs and im2col columns come from the network's shared `Workspace` (three activation
/// buffers in rotation and one scratch), valid until the next forward, and backward after it traps.
/// Parameters are `ParameterView`s of the network's `ParameterStore` (which they keep alive), bound once.
public protocol Layer: AnyObject {
    var name: String { get }
    /// Trained parameters, in state_dict order, with PyTorch shapes.
    var parameterSpecs: [ParameterSpec] { get }
    /// Non-trained state saved with the weights (BatchNorm running statistics).
    var bufferSpecs: [ParameterSpec] { get }
    func bind(parameters: ParameterStore, buffers: ParameterStore)
    func outputShape(_ input: Shape) -> Shape
    func forward(_ x: Tensor, training: Bool) -> Tensor
    /// Writes this layer's parameter gradients (overwriting) and returns the input gradient when asked.
    /// May modify `dy` in place.
    func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor?
}

extension Layer {
    public var parameterSpecs: [ParameterSpec] { [] }
    public var bufferSpecs: [ParameterSpec] { [] }
    public func bind(parameters: ParameterStore, buffers: ParameterStore) {}
}

/// Memory shared by all layers of a network: scratch for values that live only inside one call
/// (im2col columns in eval mode, column gradients in backward), the eval-mode activations, and the
/// arithmetic of the convolution GEMMs.
final class Workspace {
    let scratch = FloatBuffer()
    /// With `scratch`, the blocked tensors `DirectConvolution` needs only inside one call.
    let blockedScratch = FloatBuffer()
    var precision = Precision.fp32
    var convolutionAlgorithm = ConvolutionAlgorithm.automatic
    /// The channel block of the current training step's blocked layout (Blocked.swift), 0 when it runs
    /// channel-major (`Network.forward` sets it).
    var block = 0
    /// Per-layer times of training steps (`Network.profile`), when set.
    var profile: LayerProfile?
    let mixed = MixedPrecisionGEMM()
    /// Eval-mode activations: a layer takes a buffer that does not hold its input (a Fire module
    /// needs three at once: input, squeeze output, output).
    private let arena = [FloatBuffer(), FloatBuffer(), FloatBuffer()]

    init() {}

    /// Eval-mode storage for `shape`, in an arena buffer holding none of `inUse`; valid until the
    /// next eval-mode forward reuses it.
    func transient(_ shape: Shape, avoiding inUse: [UnsafeMutablePointer<Float>]) -> Tensor {
        for buffer in arena where !inUse.contains(where: { $0 >= buffer.pointer && $0 < buffer.pointer + buffer.capacity }) {
            return Tensor(data: buffer.reserve(shape.count), shape: shape)
        }
        preconditionFailure("eval-mode arena exhausted")
    }

    /// C = op(A)·op(B) + beta·C in this network's precision (oneDNN sgemm; in bf16, inputs rounded).
    @inline(__always)
    func gemm(transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
              a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
              beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        if precision == .bf16 {
            mixed.gemm(transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda, b: b, ldb: ldb,
                       beta: beta, c: c, ldc: ldc)
        } else {
            SqueezeEngine.gemm(transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: lda, b: b, ldb: ldb,
                               beta: beta, c: c, ldc: ldc)
        }
    }
}

/// How training-mode fp32 convolutions are computed. Eval mode (which keeps nothing for backward and
/// borrows one shared im2col scratch) and bf16 always use im2col + GEMM.
public enum ConvolutionAlgorithm: String, Sendable, CaseIterable {
    /// Per layer shape, the faster of the two on this CPU (`Conv2d.prefersOneDNN`): the default.
    case automatic
    /// im2col + oneDNN's sgemm; a 1×1 convolution is one GEMM.
    case gemm
    /// oneDNN's convolution primitives in the blocked layout they pick (`DirectConvolution`).
    case onednn
}

/// Conv2d, optionally followed by BatchNorm2d, optionally followed by ReLU (fused).
///
/// A fully connected layer is the same thing: `Linear` over a flattened (C, H, W) input is a
/// convolution whose kernel covers the whole H×W map (im2col then lays each image out as one
/// column in PyTorch's flatten order), and over a (C, N, 1, 1) input a 1×1 convolution. `flat`
/// only changes the weight's declared shape to PyTorch's (out, in) for the state_dict.
///
/// Forward: col = im2col(x) (Cin·k·k, N·Ho·Wo) — skipped for 1×1/stride 1/pad 0, where col is x itself;
/// z = W (Cout, Cin·k·k) · col + b; y = relu(bn(z)). In training, fp32 convolutions may use oneDNN's
/// convolution primitives instead of im2col + GEMM (`DirectConvolution`, see `ConvolutionAlgorithm`),
/// same formulas.
/// Backward: dz = dy ⊙ [y > 0] (through BN when present); db = Σ_cols dz; dW = dz · colᵀ;
/// dx = col2im(Wᵀ · dz).
public final class Conv2d: Layer {
    public let name: String
    public let cin: Int, cout: Int, kernel: Int, stride: Int, padding: Int
    public let relu: Bool
    /// Declares the weight as (cout, cin·k·k), as `nn.Linear` does (same memory layout).
    let flat: Bool
    let bn: BatchNorm?
    private let workspace: Workspace
    private var weight: ParameterView!  // (cout, cin·k·k)
    private var bias: ParameterView!    // (cout)
    private let col = FloatBuffer()     // (cin·k·k, N·Ho·Wo), training only: kept for dW
    private let pre = FloatBuffer()     // z (cout, N·Ho·Wo), training only: kept for BatchNorm's backward
    private let out = Slot(), dxSlot = Slot()
    private var x: Tensor?, y: Tensor?  // of the last training-mode forward
    /// oneDNN's convolution primitives for the current input shape, when they run (see `ConvolutionAlgorithm`).
    private var direct: DirectConvolution?, directInput: Shape?
    private var usedDirect = false, usedBlocked = false

    init(name: String, cin: Int, cout: Int, kernel: Int, stride: Int = 1, padding: Int = 0,
         relu: Bool, batchNorm: Bool, flat: Bool = false, workspace: Workspace) {
        self.name = name
        (self.cin, self.cout, self.kernel, self.stride, self.padding) = (cin, cout, kernel, stride, padding)
        self.relu = relu
        self.flat = flat
        self.bn = batchNorm ? BatchNorm(name: name + "_bn", channels: cout) : nil
        self.workspace = workspace
    }

    var isPointwise: Bool { kernel == 1 && stride == 1 && padding == 0 }
    var weightSpec: ParameterSpec {
        ParameterSpec(name: name + ".weight", shape: flat ? [cout, cin * kernel * kernel] : [cout, cin, kernel, kernel])
    }
    public var parameterSpecs: [ParameterSpec] {
        [weightSpec, ParameterSpec(name: name + ".bias", shape: [cout])] + (bn?.parameterSpecs ?? [])
    }
    public var bufferSpecs: [ParameterSpec] { bn?.bufferSpecs ?? [] }

    public func bind(parameters: ParameterStore, buffers: ParameterStore) {
        weight = parameters.view(name + ".weight")
        bias = parameters.view(name + ".bias")
        bn?.bind(parameters: parameters, buffers: buffers)
    }

    /// Whether oneDNN's primitives beat im2col + sgemm for this layer's shape (per-layer times of both
    /// on this project's AVX2 and AVX-512 CPUs, docs/engine.md): every k×k convolution but a stem with
    /// 3 input channels, where the reorders cost more than the convolution saves.
    var prefersOneDNN: Bool { kernel > 1 && cin > 3 }

    /// Whether this convolution can write a blocked output with channel block `block`.
    func acceptsBlocked(_ block: Int) -> Bool { !flat && cout % block == 0 }

    /// Whether a forward pass on `x` runs in the training step's blocked layout: oneDNN's primitives
    /// on x as it is (blocked or, for the stem, channel-major), y and the gradients blocked.
    func runsBlocked(_ x: Tensor, training: Bool) -> Bool {
        training && workspace.block > 0 && acceptsBlocked(workspace.block) && (x.block == 0 || x.block == workspace.block)
    }

    /// The algorithm a forward pass on `x` runs (and the backward pass after it).
    func algorithm(_ x: Shape, training: Bool) -> ConvolutionAlgorithm {
        let ys = outputShape(x)
        let fitsWindows = (ys.h - 1) * stride + kernel >= x.h + padding && (ys.w - 1) * stride + kernel >= x.w + padding
        guard training, !flat, fitsWindows, workspace.precision == .fp32 else { return .gemm }
        switch workspace.convolutionAlgorithm {
        case .automatic: return prefersOneDNN ? .onednn : .gemm
        case let chosen: return chosen
        }
    }

    /// What the last forward pass ran: oneDNN's implementation name, or `im2col+sgemm` (`sgemm` for 1×1).
    var implementation: String {
        if usedDirect, let direct { return direct.implementation }
        let gemm = isPointwise ? "sgemm" : "im2col+sgemm"
        return workspace.precision == .bf16 ? gemm + " (bf16-rounded inputs)" : gemm
    }

    /// Multiply-accumulates of one forward call on `x`.
    func macs(_ x: Shape) -> Int { outputShape(x).count * cin * kernel * kernel }

    public func outputShape(_ s: Shape) -> Shape {
        precondition(s.c == cin, "\(name): expected \(cin) input channels, got \(s.c)")
        return Shape(c: cout, n: s.n,
                     h: Kernels.outputSize(s.h, kernel: kernel, stride: stride, padding: padding),
                     w: Kernels.outputSize(s.w, kernel: kernel, stride: stride, padding: padding))
    }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        let ys = outputShape(x.shape)
        let blocked = runsBlocked(x, training: training)
        let y = training ? out.tensor(ys, block: blocked ? workspace.block : 0) : workspace.transient(ys, avoiding: [x.data])
        return forward(x, into: y, training: training)
    }

    /// Writes y into `destination` (the output shape, in the layout `runsBlocked` says), e.g. a channel
    /// range of a concatenation.
    @discardableResult
    func forward(_ x: Tensor, into destination: Tensor, training: Bool) -> Tensor {
        usedBlocked = runsBlocked(x, training: training)
        if usedBlocked { return blockedForward(x, into: destination) }
        let destination = destination.data
        let ys = outputShape(x.shape)
        let cols = ys.columns
        // z is kept for BatchNorm's backward in training; eval normalises in place.
        let z = bn == nil || !training ? destination : pre.reserve(cout * cols)
        usedDirect = algorithm(x.shape, training: training) == .onednn
        if usedDirect { prepareDirect(x, sourceBlock: 0, destinationBlock: 0) }
        let profile = training ? workspace.profile : nil
        profiled(profile, name, implementation, backward: false, flops: 2 * macs(x.shape)) {
            if usedDirect {
                direct!.forward(x: x.data, weight: weight.value, into: z)
            } else {
                im2colGEMM(x, ys, training: training, into: z)
            }
            // BatchNorm folds the bias into its shift (it subtracts the mean anyway): one pass fewer.
            if bn == nil { Kernels.addBias(z, bias: bias.value, rows: cout, columns: cols, relu: relu) }
        }
        if let bn {
            profiled(profile, bn.name, "swift", backward: false) {
                bn.forward(z, into: destination, columns: cols, training: training, relu: relu, bias: bias.value)
            }
        }
        let y = Tensor(data: destination, shape: ys)
        (self.x, self.y) = training ? (x, y) : (nil, nil)
        return y
    }

    /// Creates oneDNN's primitives for x's shape and these layouts unless the last ones fit.
    private func prepareDirect(_ x: Tensor, sourceBlock: Int, destinationBlock: Int) {
        if let direct, directInput == x.shape, direct.sourceBlock == sourceBlock, direct.destinationBlock == destinationBlock { return }
        let ys = outputShape(x.shape)
        direct = DirectConvolution(cin: cin, cout: cout, kernel: kernel, stride: stride, padding: padding,
                                   n: x.shape.n, h: x.shape.h, w: x.shape.w, ho: ys.h, wo: ys.w,
                                   sourceBlock: sourceBlock, destinationBlock: destinationBlock,
                                   scratch: (workspace.scratch, workspace.blockedScratch))
        directInput = x.shape
    }

    /// The blocked layout's forward: oneDNN writes z (into y itself when nothing follows but bias and
    /// ReLU and y is dense), then bias + ReLU or BatchNorm write y, which may be a channel slice.
    private func blockedForward(_ x: Tensor, into y: Tensor) -> Tensor {
        let block = workspace.block
        prepareDirect(x, sourceBlock: x.block, destinationBlock: block)
        usedDirect = true
        let z = bn == nil && y.isDense ? y : Tensor(blocked: pre.reserve(y.shape.count), shape: y.shape, block: block)
        let profile = workspace.profile
        profiled(profile, name, implementation, backward: false, flops: 2 * macs(x.shape)) {
            direct!.forward(x: x.data, weight: weight.value, into: z.data)
            if bn == nil { BlockedKernels.addBias(z, bias: bias.value, relu: relu, into: y) }
        }
        if let bn {
            profiled(profile, bn.name, "swift", backward: false) {
                bn.forward(blocked: z, into: y, training: true, relu: relu, bias: bias.value)
            }
        }
        (self.x, self.y) = (x, y)
        return y
    }

    /// The blocked layout's backward: dz (in dy when no BatchNorm and dy is dense, else over z), then
    /// oneDNN's backward passes.
    private func blockedBackward(_ dy: Tensor, x: Tensor, y: Tensor, into dx: Tensor?, accumulate: Bool) {
        let profile = workspace.profile
        var dz = dy
        if let bn {
            dz = Tensor(blocked: pre.pointer, shape: y.shape, block: y.block)
            profiled(profile, bn.name, "swift", backward: true) {
                bn.backward(blocked: dy, z: dz, reluOutput: relu ? y : nil, biasGrad: bias.gradient)
            }
        }
        profiled(profile, name, implementation, backward: true, flops: (dx == nil ? 2 : 4) * macs(x.shape)) {
            if bn == nil {
                if !dy.isDense { dz = Tensor(blocked: pre.pointer, shape: y.shape, block: y.block) }
                BlockedKernels.reluBackwardBiasGrad(dy, y: y, relu: relu, into: dz, biasGrad: bias.gradient)
            }
            direct!.backward(dy: dz.data, weight: weight.value, dw: weight.gradient, dx: dx?.data, accumulate: accumulate)
        }
    }

    /// z (cout, N·Ho·Wo) = W · im2col(x).
    private func im2colGEMM(_ x: Tensor, _ ys: Shape, training: Bool, into z: UnsafeMutablePointer<Float>) {
        let cols = ys.columns, depth = cin * kernel * kernel
        var source = UnsafePointer(x.data)
        if !isPointwise {
            // Training keeps the columns for dW; eval borrows the shared scratch.
            let c = (training ? col : workspace.scratch).reserve(depth * cols)
            Kernels.im2col(x, kernel: kernel, stride: stride, padding: padding, ho: ys.h, wo: ys.w, col: c)
            source = UnsafePointer(c)
        }
        workspace.gemm(m: cout, n: cols, k: depth, a: weight.value, lda: depth, b: source, ldb: cols, beta: 0, c: z, ldc: cols)
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        guard let x else { preconditionFailure("\(name): backward before forward") }
        let dx = needInputGradient ? dxSlot.tensor(x.shape, block: x.block) : nil
        backward(dy, into: dx, accumulate: false)
        return dx
    }

    /// Input gradient written into `dx` (or added to it when `accumulate`), if given.
    func backward(_ dy: Tensor, into dx: Tensor?, accumulate: Bool) {
        guard let x, let y else { preconditionFailure("\(name): backward before forward") }
        if usedBlocked { return blockedBackward(dy, x: x, y: y, into: dx, accumulate: accumulate) }
        let cols = y.shape.columns
        let profile = workspace.profile
        if let bn {
            profiled(profile, bn.name, "swift", backward: true) {
                // dy ← dz, with the ReLU mask and the bias gradient in the same two passes
                bn.backward(dy.data, z: pre.pointer, columns: cols, reluOutput: relu ? UnsafePointer(y.data) : nil, biasGrad: bias.gradient)
            }
        }
        profiled(profile, name, implementation, backward: true, flops: (dx == nil ? 2 : 4) * macs(x.shape)) {
            if bn == nil {
                Kernels.reluBackwardBiasGrad(dy.data, y: y.data, rows: cout, columns: cols, relu: relu, biasGrad: bias.gradient)
            }
            convolutionBackward(dy, x: x, y: y, into: dx, accumulate: accumulate)
        }
    }

    /// dW = dz · colᵀ and dx = col2im(Wᵀ · dz) (written, or added when `accumulate`) from dz in `dy`.
    private func convolutionBackward(_ dy: Tensor, x: Tensor, y: Tensor, into dx: Tensor?, accumulate: Bool) {
        let cols = y.shape.columns, depth = cin * kernel * kernel
        if usedDirect {
            direct!.backward(dy: dy.data, weight: weight.value, dw: weight.gradient, dx: dx?.data, accumulate: accumulate)
            return
        }
        let source = isPointwise ? UnsafePointer(x.data) : UnsafePointer(col.pointer)
        workspace.gemm(transB: true, m: cout, n: depth, k: cols, a: dy.data, lda: cols, b: source, ldb: cols,
                       beta: 0, c: weight.gradient, ldc: depth)
        guard let dx else { return }
        if isPointwise {
            workspace.gemm(transA: true, m: cin, n: cols, k: cout, a: weight.value, lda: depth, b: dy.data, ldb: cols,
                           beta: accumulate ? 1 : 0, c: dx.data, ldc: cols)
        } else {
            let dcol = workspace.scratch.reserve(depth * cols)
            workspace.gemm(transA: true, m: depth, n: cols, k: cout, a: weight.value, lda: depth, b: dy.data, ldb: cols,
                           beta: 0, c: dcol, ldc: cols)
            if !accumulate { dx.data.update(repeating: 0, count: dx.shape.count) }
            Kernels.col2im(dcol, kernel: kernel, stride: stride, padding: padding, ho: y.shape.h, wo: y.shape.w, into: dx)
        }
    }
}

/// BatchNorm2d over each channel row of a channel-major tensor (statistics over N·H·W), then ReLU.
/// Train: y = γ·(z − μ)/√(σ² + ε) + β with batch statistics (σ² biased); running statistics move by
/// `momentum` (running variance uses the unbiased σ²), as PyTorch. Eval: running statistics.
final class BatchNorm {
    let name: String, channels: Int
    let eps = ModelConfig.engineBatchNormEps, momentum: Float = 0.1
    private(set) var weight: ParameterView!, bias: ParameterView!           // γ, β (channels)
    private(set) var runningMean: ParameterView!, runningVar: ParameterView!  // (channels), in the buffer store
    let mean = FloatBuffer(), invStd = FloatBuffer()

    init(name: String, channels: Int) { self.name = name; self.channels = channels }

    var parameterSpecs: [ParameterSpec] {
        [ParameterSpec(name: name + ".weight", shape: [channels]), ParameterSpec(name: name + ".bias", shape: [channels])]
    }
    var bufferSpecs: [ParameterSpec] {
        [ParameterSpec(name: name + ".running_mean", shape: [channels]), ParameterSpec(name: name + ".running_var", shape: [channels])]
    }

    func bind(parameters: ParameterStore, buffers: ParameterStore) {
        weight = parameters.view(name + ".weight"); bias = parameters.view(name + ".bias")
        runningMean = buffers.view(name + ".running_mean"); runningVar = buffers.view(name + ".running_var")
    }

    /// z (channels, m) and y may be the same buffer (eval mode normalises in place). `bias` (the
    /// convolution's, not yet added to z) shifts only the running mean: the normalised output does not
    /// depend on it. The kept mean is z's own, for `backward`.
    func forward(_ z: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, columns m: Int, training: Bool, relu: Bool,
                 bias convBias: UnsafePointer<Float>? = nil) {
        let means = mean.reserve(channels), invStds = invStd.reserve(channels)
        let gamma = weight.value, beta = bias.value, runningMean = runningMean.value, runningVar = runningVar.value
        parallelFor(channels) { range in
        for c in range {
            let row = z + c * m, b = convBias?[c] ?? 0
            var mu: Float, variance: Float
            if training {
                mu = Kernels.sum(row, m) / Float(m)
                let q = Kernels.sumSquaredDeviation(row, m, from: mu)
                variance = q / Float(m)
                runningMean[c] = (1 - momentum) * runningMean[c] + momentum * (mu + b)
                runningVar[c] = (1 - momentum) * runningVar[c] + momentum * q / Float(max(m - 1, 1))
            } else {
                mu = runningMean[c] - b; variance = runningVar[c]
            }
            let inv = 1 / (variance + eps).squareRoot()
            means[c] = mu; invStds[c] = inv
            let scale = gamma[c] * inv, shift = beta[c] - mu * scale
            let out = y + c * m
            if relu {
                for i in 0..<m { out[i] = max(row[i] * scale + shift, 0) }
            } else {
                for i in 0..<m { out[i] = row[i] * scale + shift }
            }
        }
        }
    }

    /// g holds dL/dy and is overwritten with dL/dz (training-mode statistics). With `reluOutput` (the
    /// forward's output y), g is first masked by [y > 0]; `biasGrad` receives Σ dL/dz per channel (the
    /// gradient of a bias added before the normalisation). Two passes over each row.
    func backward(_ g: UnsafeMutablePointer<Float>, z: UnsafePointer<Float>, columns m: Int,
                  reluOutput y: UnsafePointer<Float>? = nil, biasGrad: UnsafeMutablePointer<Float>? = nil) {
        typealias V = SIMD16<Float>
        let means = mean.pointer, invStds = invStd.pointer
        let gamma = weight.value, dgamma = weight.gradient, dbeta = bias.gradient
        parallelFor(channels) { range in
        for c in range {
            let row = g + c * m, zr = z + c * m, yr = y.map { $0 + c * m }
            let mu = means[c], inv = invStds[c]
            let (sumG, sumGZ) = Self.maskedSums(row, zr, yr, m)
            let sumGX = (sumGZ - mu * sumG) * inv  // Σ g·x̂
            dbeta[c] = sumG; dgamma[c] = sumGX
            let k = gamma[c] * inv / Float(m)
            // dz = k·(m·g − Σg − x̂·Σg·x̂) = a·g + b0 + b1·(z − μ)
            let a = k * Float(m), b0 = -k * sumG, b1 = -k * inv * sumGX
            var acc = V(), i = 0
            while i + V.scalarCount <= m {
                var v = Self.load(row + i)
                if let yr { v.replace(with: 0, where: Self.load(yr + i) .<= 0) }
                let d = a * v + b0 + b1 * (Self.load(zr + i) - mu)
                UnsafeMutableRawPointer(row + i).storeBytes(of: d, as: V.self)
                acc += d
                i += V.scalarCount
            }
            var sum = acc.sum()
            while i < m {
                let v = yr == nil || yr![i] > 0 ? row[i] : 0
                row[i] = a * v + b0 + b1 * (zr[i] - mu)
                sum += row[i]
                i += 1
            }
            biasGrad?[c] = sum
        }
        }
    }

    @inline(__always) private static func load(_ p: UnsafePointer<Float>) -> SIMD16<Float> {
        UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self)
    }

    /// (Σ g, Σ g·z) over one row, g masked by [y > 0] when y is given (SIMD partial sums).
    @inline(__always) private static func maskedSums(_ g: UnsafePointer<Float>, _ z: UnsafePointer<Float>,
                                                     _ y: UnsafePointer<Float>?, _ m: Int) -> (Float, Float) {
        var sg = SIMD16<Float>(), sgz = SIMD16<Float>(), i = 0
        while i + 16 <= m {
            var v = load(g + i)
            if let y { v.replace(with: 0, where: load(y + i) .<= 0) }
            sg += v; sgz += v * load(z + i)
            i += 16
        }
        var (a, b) = (sg.sum(), sgz.sum())
        while i < m {
            let v = y == nil || y![i] > 0 ? g[i] : 0
            a += v; b += v * z[i]
            i += 1
        }
        return (a, b)
    }
}

/// Fire module (SqueezeNet): squeeze 1×1 conv + ReLU, then expand 1×1 and expand 3×3 (pad 1), each
/// + ReLU, concatenated along channels: y = [relu(e1(s)); relu(e3(s))], s = relu(squeeze(x)).
/// With a simple bypass (the paper's Table 3), y += x.
/// The expands write straight into their channel ranges of y, so the concat costs nothing.
public final class Fire: Layer {
    public let name: String
    let squeeze: Conv2d, expand1x1: Conv2d, expand3x3: Conv2d
    let bypass: Bool
    private let workspace: Workspace
    private let sOut = Slot(), out = Slot(), sum = Slot(), dS = Slot(), dX = Slot()

    init(name: String, input: Int, squeeze s: Int, expand1x1 e1: Int, expand3x3 e3: Int,
         bypass: Bool, batchNorm: Bool, workspace: Workspace) {
        self.name = name
        squeeze = Conv2d(name: name + ".squeeze", cin: input, cout: s, kernel: 1, relu: true, batchNorm: batchNorm, workspace: workspace)
        expand1x1 = Conv2d(name: name + ".expand1x1", cin: s, cout: e1, kernel: 1, relu: true, batchNorm: batchNorm, workspace: workspace)
        expand3x3 = Conv2d(name: name + ".expand3x3", cin: s, cout: e3, kernel: 3, padding: 1, relu: true, batchNorm: batchNorm, workspace: workspace)
        precondition(!bypass || input == e1 + e3, "\(name): a simple bypass needs input channels == output channels")
        self.bypass = bypass
        self.workspace = workspace
    }

    var outputChannels: Int { expand1x1.cout + expand3x3.cout }
    public var parameterSpecs: [ParameterSpec] { squeeze.parameterSpecs + expand1x1.parameterSpecs + expand3x3.parameterSpecs }
    public var bufferSpecs: [ParameterSpec] { squeeze.bufferSpecs + expand1x1.bufferSpecs + expand3x3.bufferSpecs }
    public func bind(parameters: ParameterStore, buffers: ParameterStore) {
        for c in [squeeze, expand1x1, expand3x3] { c.bind(parameters: parameters, buffers: buffers) }
    }
    public func outputShape(_ s: Shape) -> Shape { Shape(c: outputChannels, n: s.n, h: s.h, w: s.w) }

    /// Whether all three convolutions can write blocked outputs with channel block `block`.
    func acceptsBlocked(_ block: Int) -> Bool { [squeeze, expand1x1, expand3x3].allSatisfy { $0.acceptsBlocked(block) } }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        let sShape = squeeze.outputShape(x.shape), yShape = outputShape(x.shape)
        let block = squeeze.runsBlocked(x, training: training) ? workspace.block : 0
        let sBuffer = training ? sOut.tensor(sShape, block: block) : workspace.transient(sShape, avoiding: [x.data])
        let s = squeeze.forward(x, into: sBuffer, training: training)
        let y = training ? out.tensor(yShape, block: block) : workspace.transient(yShape, avoiding: [x.data, s.data])
        expand1x1.forward(s, into: y.channels(0, expand1x1.cout), training: training)
        expand3x3.forward(s, into: y.channels(expand1x1.cout, expand3x3.cout), training: training)
        guard bypass else { return y }
        if !training {  // no backward: add in place
            for i in 0..<y.shape.count { y.data[i] += x.data[i] }
            return y
        }
        // A separate buffer: the expands' ReLU masks in backward need their own outputs.
        var total = y
        total.data = sum.buffer.reserve(y.shape.count)
        for i in 0..<y.shape.count { total.data[i] = y.data[i] + x.data[i] }
        return total
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        let inShape = Shape(c: squeeze.cin, n: dy.shape.n, h: dy.shape.h, w: dy.shape.w)
        let dx = needInputGradient ? dX.tensor(inShape, block: dy.block) : nil
        if let dx, bypass { dx.data.update(from: dy.data, count: dy.shape.count) }  // before the masks below
        let ds = dS.tensor(Shape(c: squeeze.cout, n: dy.shape.n, h: dy.shape.h, w: dy.shape.w), block: dy.block)
        expand1x1.backward(dy.channels(0, expand1x1.cout), into: ds, accumulate: false)
        expand3x3.backward(dy.channels(expand1x1.cout, expand3x3.cout), into: ds, accumulate: true)
        squeeze.backward(ds, into: dx, accumulate: bypass)
        return dx
    }
}

/// MaxPool2d without padding, with PyTorch's output size and window clipping for ceil_mode=True
/// (SqueezeNet's pools) or False (AlexNet's).
public final class MaxPool: Layer {
    public let name: String
    let kernel: Int, stride: Int, ceilMode: Bool
    private let workspace: Workspace
    private let out = Slot(), dX = Slot()
    private var argmax = [Int32]()  // (C, N, Ho, Wo): offsets within the input plane, training only
    private var inShape: Shape?     // of the last training-mode forward
    private var inBlock = 0         // its layout

    init(name: String, kernel: Int = 3, stride: Int = 2, ceilMode: Bool = true, workspace: Workspace = Workspace()) {
        self.name = name; self.kernel = kernel; self.stride = stride; self.ceilMode = ceilMode
        self.workspace = workspace
    }

    public func outputShape(_ s: Shape) -> Shape {
        Shape(c: s.c, n: s.n, h: Kernels.outputSize(s.h, kernel: kernel, stride: stride, padding: 0, ceilMode: ceilMode),
              w: Kernels.outputSize(s.w, kernel: kernel, stride: stride, padding: 0, ceilMode: ceilMode))
    }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        let ys = outputShape(x.shape)
        guard training else {
            let y = workspace.transient(ys, avoiding: [x.data])
            Kernels.maxPoolForward(x, kernel: kernel, stride: stride, ho: ys.h, wo: ys.w, y: y.data, argmax: nil)
            inShape = nil
            return y
        }
        let y = out.tensor(ys, block: x.block)
        if argmax.count < ys.count { argmax = [Int32](repeating: 0, count: ys.count) }
        argmax.withUnsafeMutableBufferPointer {
            if x.block > 0 {
                BlockedKernels.maxPoolForward(x, kernel: kernel, stride: stride, into: y, argmax: $0.baseAddress!)
            } else {
                Kernels.maxPoolForward(x, kernel: kernel, stride: stride, ho: ys.h, wo: ys.w, y: y.data, argmax: $0.baseAddress!)
            }
        }
        (inShape, inBlock) = (x.shape, x.block)
        return y
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        guard needInputGradient, let inShape else { return nil }
        let dx = dX.tensor(inShape, block: inBlock)
        argmax.withUnsafeBufferPointer {
            if inBlock > 0 {
                BlockedKernels.maxPoolBackward(dy, argmax: $0.baseAddress!, into: dx)
            } else {
                Kernels.maxPoolBackward(dy.data, argmax: $0.baseAddress!, planes: inShape.c * inShape.n,
                                        outPlane: dy.shape.plane, dx: dx.data, inPlane: inShape.plane)
            }
        }
        return dx
    }
}

/// Dropout (inverted): in training y = x · m with m = 1/(1−p) with probability 1−p, else 0; identity in eval.
/// Works in place on its input. The mask comes from the layer's own seeded generator (`rng`), which the
/// trainer reseeds from (seed, rank, step) before every step, so nothing of it is checkpointed: each
/// forward draws one word from it, and chunk k of the mask comes from stream k of that word (two
/// 24-bit uniforms per 64-bit draw), so chunks fill in parallel and the mask does not depend on the
/// thread count.
public final class Dropout: Layer {
    public let name: String
    public let p: Float
    public var rng: SeededRNG
    private let mask = FloatBuffer()
    private var active = false
    static let chunk = 1 << 14

    init(name: String, p: Float, rng: SeededRNG) { self.name = name; self.p = p; self.rng = rng }

    public func outputShape(_ s: Shape) -> Shape { s }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        active = training && p > 0
        guard active else { return x }
        let n = x.shape.count, m = mask.reserve(n), data = x.data
        let seed = rng.next(), p = p, scale = 1 / (1 - p)
        parallelFor((n + Self.chunk - 1) / Self.chunk) { chunks in
            for k in chunks {
                var generator = SeededRNG(seed: seed, stream: UInt64(k))
                @inline(__always) func apply(_ i: Int, _ bits: UInt64) {
                    m[i] = Float(bits) * (1.0 / 16_777_216.0) >= p ? scale : 0
                    data[i] *= m[i]
                }
                var i = k * Self.chunk
                let end = min(n, i + Self.chunk)
                while i + 1 < end {
                    let r = generator.next()
                    apply(i, r >> 40); apply(i + 1, (r >> 16) & 0xFF_FFFF)
                    i += 2
                }
                if i < end { apply(i, generator.next() >> 40) }
            }
        }
        return x
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        guard needInputGradient else { return nil }
        if active {
            let m = mask.pointer, g = dy.data
            parallelFor(dy.shape.count, minimumPerThread: Self.chunk) { range in
                for i in range { g[i] *= m[i] }
            }
        }
        return dy
    }
}

/// Global average pooling: y[c][n] = mean over the H×W plane of x[c][n]. Output (C, N, 1, 1).
public final class GlobalAvgPool: Layer {
    public let name: String
    private let workspace: Workspace
    private let out = Slot(), dX = Slot()
    private var inShape: Shape?

    init(name: String, workspace: Workspace = Workspace()) { self.name = name; self.workspace = workspace }

    public func outputShape(_ s: Shape) -> Shape { Shape(c: s.c, n: s.n, h: 1, w: 1) }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        let y = training ? out.tensor(outputShape(x.shape)) : workspace.transient(outputShape(x.shape), avoiding: [x.data])
        let plane = x.shape.plane
        for i in 0..<(x.shape.c * x.shape.n) {
            var s: Float = 0
            let src = x.data + i * plane
            for j in 0..<plane { s += src[j] }
            y.data[i] = s / Float(plane)
        }
        inShape = training ? x.shape : nil
        return y
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        guard needInputGradient, let inShape else { return nil }
        let dx = dX.tensor(inShape)
        let plane = inShape.plane
        for i in 0..<(inShape.c * inShape.n) {
            (dx.data + i * plane).update(repeating: dy.data[i] / Float(plane), count: plane)
        }
        return dx
    }
}

/// AdaptiveAvgPool2d to a fixed `size`×`size` map, with PyTorch's bins: output row i averages input
/// rows ⌊i·H/size⌋ ..< ⌈(i+1)·H/size⌉ (bins overlap or repeat when H is not a multiple, e.g. a 1×1
/// map becomes `size`×`size` copies).
public final class AdaptiveAvgPool: Layer {
    public let name: String
    let size: Int
    private let workspace: Workspace
    private let out = Slot(), dX = Slot()
    private var inShape: Shape?

    init(name: String, size: Int, workspace: Workspace = Workspace()) { self.name = name; self.size = size; self.workspace = workspace }

    public func outputShape(_ s: Shape) -> Shape { Shape(c: s.c, n: s.n, h: size, w: size) }

    private func bin(_ i: Int, _ extent: Int) -> Range<Int> { (i * extent / size)..<(((i + 1) * extent + size - 1) / size) }

    public func forward(_ x: Tensor, training: Bool) -> Tensor {
        let y = training ? out.tensor(outputShape(x.shape)) : workspace.transient(outputShape(x.shape), avoiding: [x.data])
        let (h, w) = (x.shape.h, x.shape.w)
        for p in 0..<(x.shape.c * x.shape.n) {
            let src = x.data + p * h * w, dst = y.data + p * size * size
            for i in 0..<size {
                let rows = bin(i, h)
                for j in 0..<size {
                    let cols = bin(j, w)
                    var s: Float = 0
                    for r in rows { for c in cols { s += src[r * w + c] } }
                    dst[i * size + j] = s / Float(rows.count * cols.count)
                }
            }
        }
        inShape = training ? x.shape : nil
        return y
    }

    public func backward(_ dy: Tensor, needInputGradient: Bool) -> Tensor? {
        guard needInputGradient, let inShape else { return nil }
        let dx = dX.tensor(inShape)
        let (h, w) = (inShape.h, inShape.w)
        dx.data.update(repeating: 0, count: inShape.count)
        for p in 0..<(inShape.c * inShape.n) {
            let src = dy.data + p * size * size, dst = dx.data + p * h * w
            for i in 0..<size {
                let rows = bin(i, h)
                for j in 0..<size {
                    let cols = bin(j, w)
                    let g = src[i * size + j] / Float(rows.count * cols.count)
                    for r in rows { for c in cols { dst[r * w + c] += g } }
                }
            }
        }
        return dx
    }
}
