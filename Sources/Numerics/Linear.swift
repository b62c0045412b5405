import CKernels
import Dispatch
import Foundation

/// Worker threads for the products. Results never depend on it: work is split into blocks of
/// output elements, each computed the same way whichever worker takes it and however large.
public enum Parallelism {
    nonisolated(unsafe) public private(set) static var threads = 1

    /// Call once at start-up (the CLI's `--threads`).
    public static func setThreads(_ count: Int) {
        threads = max(1, count)
    }

    /// Runs `body(i)` for `i` in `0..<count`, spread over `threads` workers (round-robin).
    public static func forEach(_ count: Int, _ body: @Sendable (Int) -> Void) {
        let workers = max(1, min(threads, count))
        if workers == 1 {
            for i in 0..<count { body(i) }
            return
        }
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            var i = worker
            while i < count {
                body(i)
                i += workers
            }
        }
    }
}

/// Lets raw pointers cross into workers that touch disjoint memory.
struct UncheckedSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// `y = x · Wᵀ + bias`: `x` `[M, K]`, `weight` `[N, K]` (PyTorch Linear layout) in its stored
/// dtype, `bias` `[N]`; result `[M, N]`. The native kernels read the weight packed once into panels
/// of 16 columns (as stored for f32, rounded to bf16 for bf16); `Kernels.precision` chooses f32
/// multiply-adds or bf16 products summed in f32.
///
/// Row invariance: each output element is summed in one order fixed by K alone (f32: one chain of
/// fused multiply-adds in increasing k, `dl_gemm_panels`; bf16: one chain over the pairs of k as
/// `vdpbf16ps` adds them, `dl_gemm_bf16_panels`; see `ReferenceKernels.linearInKernelOrder` and
/// `linearBF16InKernelOrder`), so row `r`'s bits are the same whatever other rows `x` holds,
/// whatever the thread count and whichever CPU path runs. All rows of a batch (every image's
/// patches, every prompt, every decode row) can therefore share one call, and the weights stream
/// from memory once for all of them. Workers take fixed blocks of output columns (multiples of
/// 16, the panel width); K is never split.
public func linear(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil) -> Matrix {
    linear(x, weight, bias: bias, path: Kernels.path, precision: Kernels.precision)
}

/// `linear` on a given kernel path and precision (tests compare the paths).
func linear(_ x: Matrix, _ weight: WeightMatrix, bias: [Float]? = nil, path kernelPath: KernelPath,
            precision: Precision = .f32) -> Matrix {
    precondition(x.columns == weight.columns, "linear: input has \(x.columns) features, weight expects \(weight.columns)")
    let m = x.rows, n = weight.rows, k = weight.columns
    if kernelPath == .reference {
        var output = weight.storageType == .q8 ? ReferenceKernels.linearQ8InKernelOrder(x, weight)
            : precision == .f32 ? ReferenceKernels.linearInKernelOrder(x, weight) : ReferenceKernels.linearBF16InKernelOrder(x, weight)
        if let bias { addBias(&output.values, bias, rows: m) }
        return output
    }
    if weight.storageType == .q8 {
        var output = linearQ8(x, weight, path: kernelPath)
        if let bias { addBias(&output.values, bias, rows: m) }
        return output
    }
    var output = [Float](repeating: 0, count: m * n)
    if m > 0 && n > 0 {
        let path = kernelPath.cValue, type = weight.storageType.kernelType
        let columnBlock = max(16, min(256, (n + 15) / 16 / max(Parallelism.threads * 4, 1) * 16))
        let blocks = (n + columnBlock - 1) / columnBlock
        // bf16: the activations are rounded once per call, not once per weight block.
        let roundedInput: [UInt16] = precision == .bf16 ? x.values.withUnsafeBufferPointer { xp in
            [UInt16](unsafeUninitializedCapacity: m * k) { buffer, count in
                dl_narrow_bf16(xp.baseAddress!, buffer.baseAddress!, m * k)
                count = m * k
            }
        } : []
        // f32: the packed panels; bf16: the bf16 panels (made on the first product with this weight).
        let usesAMX = precision == .bf16 && kernelPath == .amx
        let weightBase = precision == .f32 ? weight.panels() : weight.panelsBF16()
        let bf16Path = kernelPath == .avx512bf16 ? Int32(DL_PATH_AVX512_BF16) : path
        x.values.withUnsafeBufferPointer { xp in
            roundedInput.withUnsafeBufferPointer { rp in
                output.withUnsafeMutableBufferPointer { yp in
                    let pointers = UncheckedSendable((xp.baseAddress!, rp.baseAddress, yp.baseAddress!, weightBase))
                    Parallelism.forEach(blocks) { b in
                        let (xBase, roundedBase, yBase, weightBase) = pointers.value
                        let columns = (b * columnBlock, min(n, (b + 1) * columnBlock))
                        if usesAMX, let roundedBase {
                            dl_gemm_amx(roundedBase, k, m, weightBase, k, columns.0, columns.1, yBase, n)
                        } else if precision == .bf16, let roundedBase {
                            dl_gemm_bf16_panels(bf16Path, roundedBase, k, m, weightBase, k, columns.0, columns.1, yBase, n)
                        } else {
                            dl_gemm_panels(path, type, xBase, k, m, weightBase, k, columns.0, columns.1, yBase, n)
                        }
                    }
                }
            }
        }
    }
    if let bias { addBias(&output, bias, rows: m) }
    return Matrix(rows: m, columns: n, values: output)
}

/// `x · Wᵀ` for a q8 weight: the rows of `x` quantized once per call (`dl_quantize_activations_q8`),
/// then `dl_gemm_q8` over fixed blocks of output columns, as the float kernels. Row invariant:
/// a row's quantization and each output's summation order depend on K alone.
func linearQ8(_ x: Matrix, _ weight: WeightMatrix, path kernelPath: KernelPath) -> Matrix {
    let m = x.rows, n = weight.rows, k = weight.columns
    var output = [Float](repeating: 0, count: m * n)
    guard m > 0, n > 0, let scales = weight.scales else { return Matrix(rows: m, columns: n, values: output) }
    let recordBytes = dl_q8_activation_row_bytes(k)
    let records = OwnedStorage(byteCount: m * recordBytes)
    x.values.withUnsafeBufferPointer { xp in dl_quantize_activations_q8(xp.baseAddress!, k, m, k, records.pointer) }
    let rowBlock = max(4, (192 << 10) / max(recordBytes, 1) / 4 * 4)
    let columnBlock = max(16, min(256, (n + 15) / 16 / max(Parallelism.threads * 4, 1) * 16))
    let blocks = (n + columnBlock - 1) / columnBlock, path = kernelPath.cValue
    output.withUnsafeMutableBufferPointer { yp in
        let pointers = UncheckedSendable((UnsafeRawPointer(records.pointer), yp.baseAddress!, weight.base, scales))
        Parallelism.forEach(blocks) { b in
            let (recordBase, yBase, quants, scaleBase) = pointers.value
            let columns = (b * columnBlock, min(n, (b + 1) * columnBlock))
            dl_gemm_q8(path, recordBase, m, quants.assumingMemoryBound(to: Int8.self), scaleBase.assumingMemoryBound(to: UInt16.self), k,
                       columns.0, columns.1, yBase, n, rowBlock)
        }
    }
    return withExtendedLifetime(records) { Matrix(rows: m, columns: n, values: output) }
}

/// The arithmetic of the matrix products.
public enum Precision: String, Sendable, Codable, CaseIterable {
    /// f32 products and accumulation: what the parity goldens are checked at. (Products with
    /// q8 weights always run the 8-bit arithmetic of `dl_gemm_q8`, whatever the precision.)
    case f32
    /// Activations and weights rounded to bf16, products summed in f32 (`vdpbf16ps`), as PyTorch
    /// bf16 and llama.cpp's bf16 do; norms, attention and softmax stay f32.
    case bf16

    /// The precision a command uses unless told otherwise: bf16 where its products are faster than
    /// f32 ones, with identical captions on the shipped model (docs/PERFORMANCE.md, "Kernels on
    /// AVX512-BF16 without AMX"): on `amx` (AMX-BF16 tiles), and on `avx512bf16` where the CPU runs
    /// `vdpbf16ps` at the f32 FMA rate (AMD Zen 4 and 5). f32 elsewhere: on Intel CPUs with
    /// AVX512-BF16 but no AMX, `vdpbf16ps` runs at half the FMA rate, so bf16 prompts were 0.6x as
    /// fast as f32 ones when measured; and on any path without a bf16 instruction.
    public static var preferred: Precision {
        switch Kernels.path {
        case .amx: .bf16
        case .avx512bf16: Kernels.bf16DotProductsAtFMARate ? .bf16 : .f32
        default: .f32
        }
    }

    /// Whether this CPU runs the precision at full speed (bf16 needs AVX512-BF16 or AMX-BF16;
    /// elsewhere only the plain emulation would run it).
    public var isNative: Bool {
        self == .f32 || KernelPath.avx512bf16.isAvailable || KernelPath.amx.isAvailable
    }
}

/// The CPU path of the matrix kernels: the fastest this CPU runs, or the one `DLLAVA_KERNEL`
/// names (`reference`, `scalar`, `avx2`, `avx512`, `avx512bf16`, `amx`), so that tests and CI
/// exercise every path on one machine. Every path computes the same bits, except bf16 products on
/// `amx`, whose additions are the hardware's own (row and thread invariant all the same; see
/// bf16_amx.c). bf16 products on a path without a bf16 instruction run the plain twin.
public enum KernelPath: String, Sendable, CaseIterable {
    /// `ReferenceKernels.linearInKernelOrder`: the plain Swift twin of the kernels.
    case reference
    case scalar
    case avx2
    case avx512
    /// `avx512`, with bf16 products on AVX512-BF16's `vdpbf16ps` (packed panels).
    case avx512bf16
    /// `avx512`, with bf16 products on Intel AMX tiles (`tdpbf16ps`).
    case amx

    var cValue: Int32 {
        switch self {
        case .reference, .scalar: Int32(DL_PATH_SCALAR)
        case .avx2: Int32(DL_PATH_AVX2)
        case .avx512, .avx512bf16, .amx: Int32(DL_PATH_AVX512)
        }
    }

    /// Whether the path runs bf16 products on a bf16 instruction (else on the plain twin).
    public var hasBF16Instructions: Bool { self == .avx512bf16 || self == .amx }

    /// Whether this CPU can run the path.
    public var isAvailable: Bool {
        switch self {
        case .reference: true
        case .amx: dl_kernel_amx_available() != 0
        case .avx512bf16: dl_kernel_path_available(Int32(DL_PATH_AVX512_BF16)) != 0
        default: dl_kernel_path_available(cValue) != 0
        }
    }
}

public enum KernelError: Error, CustomStringConvertible {
    case unknownPath(String)
    case unavailablePath(KernelPath)

    public var description: String {
        switch self {
        case .unknownPath(let name):
            "DLLAVA_KERNEL=\(name) is not a kernel path (\(KernelPath.allCases.map(\.rawValue).joined(separator: ", ")))"
        case .unavailablePath(let path):
            "DLLAVA_KERNEL=\(path.rawValue): this CPU cannot run that kernel path"
        }
    }
}

public enum Kernels {
    nonisolated(unsafe) private static var chosen: KernelPath?

    /// The path every product takes; read from `DLLAVA_KERNEL` at first use.
    public static var path: KernelPath {
        if let chosen { return chosen }
        let path = (try? pathFromEnvironment()) ?? best
        chosen = path
        return path
    }

    /// The fastest path this CPU runs.
    public static var best: KernelPath {
        if KernelPath.amx.isAvailable { return .amx }
        if KernelPath.avx512bf16.isAvailable { return .avx512bf16 }
        return switch dl_kernel_path_best() {
        case Int32(DL_PATH_AVX512): .avx512
        case Int32(DL_PATH_AVX2): .avx2
        default: .scalar
        }
    }

    /// The CPU features the kernels ask about (cpu_features.c answers each), with whether this
    /// CPU has them: what `dllava doctor` prints as the reason for the path and precision.
    public static var cpuFeatures: [(name: String, present: Bool)] {
        [("AVX2+FMA+F16C", KernelPath.avx2.isAvailable), ("AVX-512 F/BW/VL/DQ", KernelPath.avx512.isAvailable),
         ("AVX512-BF16", KernelPath.avx512bf16.isAvailable), ("AVX512-VNNI", dl_kernel_q8_vnni_available() != 0),
         ("AMX-BF16 (tile data granted by the OS)", KernelPath.amx.isAvailable),
         ("vendor AMD (vdpbf16ps at the f32 FMA rate)", bf16DotProductsAtFMARate)]
    }

    /// Whether this CPU runs `vdpbf16ps` (64 FLOPs an instruction) at the rate of an f32 FMA (32):
    /// AMD's Zen 4 and 5. Measured Intel Xeons without AMX run it at half that rate.
    public static var bf16DotProductsAtFMARate: Bool { dl_cpu_is_amd() != 0 }

    /// Why `Precision.preferred` is what it is on `path`, in words.
    public static func precisionReason(on path: KernelPath) -> String {
        switch path {
        case .amx: "bf16 products on AMX tiles (tdpbf16ps)"
        case .avx512bf16 where bf16DotProductsAtFMARate:
            "bf16 products on AVX512-BF16 (vdpbf16ps), no AMX; this AMD CPU runs vdpbf16ps at the f32 FMA rate"
        case .avx512bf16:
            "AVX512-BF16 without AMX on an Intel CPU, where vdpbf16ps runs at half the f32 FMA rate, so f32 prompts are faster; --precision bf16 halves the K/V cache and speeds one-row decode (docs/PERFORMANCE.md)"
        default: "the \(path.rawValue) path has no bf16 instruction, so bf16 would run the plain emulation"
        }
    }

    /// The path `DLLAVA_KERNEL` asks for, nil when unset; throws for an unknown or unavailable one.
    /// The CLI calls it at start-up so a wrong value is an error, not a silent fallback.
    public static func pathFromEnvironment() throws(KernelError) -> KernelPath? {
        guard let name = ProcessInfo.processInfo.environment["DLLAVA_KERNEL"], !name.isEmpty else { return nil }
        guard let path = KernelPath(rawValue: name) else { throw .unknownPath(name) }
        guard path.isAvailable else { throw .unavailablePath(path) }
        return path
    }

    /// Forces a path (tests, benchmarks); the caller checks `isAvailable`.
    public static func use(_ path: KernelPath) {
        chosen = path
    }

    /// The precision every product uses: f32 until the CLI sets it once at start-up.
    nonisolated(unsafe) public private(set) static var precision = Precision.f32

    public static func use(_ precision: Precision) {
        self.precision = precision
    }
}

extension StorageType {
    var kernelType: Int32 {
        switch self {
        case .float32: Int32(DL_WEIGHT_F32)
        case .float16: Int32(DL_WEIGHT_F16)
        case .bfloat16: Int32(DL_WEIGHT_BF16)
        case .q8: preconditionFailure("q8 weights go through dl_gemm_q8")
        }
    }
}

func addBias(_ output: inout [Float], _ bias: [Float], rows m: Int) {
    let n = bias.count
    precondition(output.count == m * n, "linear: bias has \(n) values, output rows have \(output.count / max(m, 1))")
    output.withUnsafeMutableBufferPointer { yp in
        bias.withUnsafeBufferPointer { bp in
            for r in 0..<m {
                let row = yp.baseAddress! + r * n
                for c in 0..<n { row[c] += bp[c] }
            }
        }
    }
}
