// `dllava doctor`: the kernel path and default precision this machine gets, and why.
import CommandLineSupport
import Foundation
import Testing

@Suite("dllava doctor")
struct DoctorTests {
    /// `dllava doctor` with DLLAVA_KERNEL set to `path` (unset when nil).
    func doctor(kernel path: String?) throws -> ProcessResult {
        var environment = ProcessInfo.processInfo.environment
        environment["DLLAVA_KERNEL"] = path
        return try runDLLaVA(["doctor"], environment: environment)
    }

    @Test func doctorSaysThePathTheDefaultPrecisionAndTheCPUFeatures() throws {
        let best = try doctor(kernel: nil)
        #expect(best.status == 0)
        let lines = best.standardOutput.split(separator: "\n").map(String.init)
        let path = try #require(lines.first?.wholeMatch(of: #/kernel path: (\w+) \(the fastest this CPU runs\)/#)?.1)
        // bf16 by default on AMX, and on AVX512-BF16 where the CPU is AMD's (vdpbf16ps at the FMA rate).
        let amd = lines.contains { $0.contains("vendor AMD (vdpbf16ps at the f32 FMA rate) yes") }
        let precision = path == "amx" || (path == "avx512bf16" && amd) ? "bf16" : "f32"
        #expect(lines.contains { $0.hasPrefix("default precision: \(precision) (") }, "\(best.standardOutput)")
        #expect(lines.contains { $0.hasPrefix("CPU features: AVX2+FMA+F16C ") && $0.contains("AVX512-BF16 ") }, "\(best.standardOutput)")

        let scalar = try doctor(kernel: "scalar")
        #expect(scalar.status == 0)
        #expect(scalar.standardOutput.hasPrefix("kernel path: scalar (DLLAVA_KERNEL)\ndefault precision: f32 (the scalar path has no bf16 instruction"))
    }

    @Test func anUnknownKernelPathIsAConfigurationError() throws {
        let result = try doctor(kernel: "avx9")
        #expect(result.status == 78)
        #expect(result.standardError.contains("DLLAVA_KERNEL=avx9 is not a kernel path"))
    }
}
