import Testing
@testable import Numerics

@Suite("Weight packing time")
struct WeightPackingTests {
    @Test("packing a weight on its first f32 product is timed apart, once")
    func firstProductPacksAndIsTimed() {
        let weight = WeightMatrix(randomRows: 512, columns: 512, storageType: .float16, seed: 7)
        let x = Matrix(rows: 2, columns: 512, values: (0..<1024).map { Float($0 % 7) / 7 })
        let before = WeightPacking.milliseconds
        _ = linear(x, weight, path: Kernels.path, precision: .f32)
        #expect(WeightPacking.milliseconds > before, "the first product packed the weight and counted the time")
        let cache = weight.panels()
        _ = linear(x, weight, path: Kernels.path, precision: .f32)
        #expect(weight.panels() == cache, "the second product reuses the packed panels")
    }
}
