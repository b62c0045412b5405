import ArgumentParser
import Numerics

/// `dllava doctor`: which kernel path and default precision this machine gets, and why.
struct Doctor: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the kernel path and default precision this machine gets, and the CPU features behind them.",
        discussion: "DLLAVA_KERNEL forces a path (reference, scalar, avx2, avx512, avx512bf16, amx); the default precision follows the path.")

    func run() throws {
        try reportingFailures {
            let forced = try Kernels.pathFromEnvironment()
            let path = forced ?? Kernels.best
            print("kernel path: \(path.rawValue) (\(forced == nil ? "the fastest this CPU runs" : "DLLAVA_KERNEL"))")
            Kernels.use(path)
            print("default precision: \(Precision.preferred.rawValue) (\(Kernels.precisionReason(on: path)))")
            print("CPU features: " + Kernels.cpuFeatures.map { "\($0.name) \($0.present ? "yes" : "no")" }.joined(separator: ", "))
        }
    }
}
