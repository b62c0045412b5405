// PNG and JPEG encoding (kept-patch images, report thumbnails) and the kept-patch overlay.
import Foundation
@testable import Imaging
import Testing

@Suite("Encoding images and drawing kept patches")
struct EncodingTests {
    /// A 6 x 4 image whose pixel (x, y) is (40x, 60y, 200).
    func gradient() -> RGBImage {
        var pixels: [UInt8] = []
        for y in 0..<4 { for x in 0..<6 { pixels += [UInt8(40 * x), UInt8(60 * y), 200] } }
        return RGBImage(width: 6, height: 4, pixels: pixels)
    }

    @Test func pngRoundTripsExactlyThroughTheDecoder() throws {
        let image = gradient()
        let png = try image.pngData()
        #expect(png.prefix(8) == Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
        #expect(try ImageDecoder().decode(data: png, name: "gradient.png") == image)
    }

    @Test func jpegDecodesToTheSameSizeAndNearlyTheSamePixels() throws {
        var pixels: [UInt8] = []
        for _ in 0..<(32 * 32) { pixels += [180, 90, 30] }
        let image = RGBImage(width: 32, height: 32, pixels: pixels)
        let decoded = try ImageDecoder().decode(data: try image.jpegData(quality: 90), name: "flat.jpg")
        #expect(decoded.width == 32 && decoded.height == 32)
        #expect(zip(decoded.pixels, image.pixels).allSatisfy { abs(Int($0) - Int($1)) <= 3 })
    }

    @Test func droppedPatchesAreDarkenedAndTheKeptRegionIsOutlined() {
        var pixels: [UInt8] = []
        for _ in 0..<(8 * 8) { pixels += [100, 150, 200] }
        let square = RGBImage(width: 8, height: 8, pixels: pixels)
        // A 2 x 2 grid of 4-pixel patches; patch 1 (top right) kept.
        let drawn = KeptPatches.overlay(square, grid: 2, kept: [1])
        func pixel(_ x: Int, _ y: Int) -> [UInt8] { Array(drawn.pixels[(y * 8 + x) * 3 ..< (y * 8 + x) * 3 + 3]) }
        #expect(pixel(0, 0) == [30, 45, 60] && pixel(3, 7) == [30, 45, 60] && pixel(7, 7) == [30, 45, 60])
        #expect(pixel(5, 2) == [100, 150, 200])  // inside the kept patch
        #expect(pixel(4, 1) == [255, 214, 0] && pixel(7, 0) == [255, 214, 0] && pixel(6, 3) == [255, 214, 0])  // its edge
        // Every patch kept: only the image's own border is outlined.
        let all = KeptPatches.overlay(square, grid: 2, kept: [0, 1, 2, 3])
        #expect(Array(all.pixels[(3 * 8 + 3) * 3 ..< (3 * 8 + 3) * 3 + 3]) == [100, 150, 200])
    }
}
