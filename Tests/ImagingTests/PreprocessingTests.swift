import Foundation
import Testing
@testable import Imaging

/// Parity with LLaVA-1.5's preprocessing (expand2square + slow CLIPImageProcessor), against the
/// goldens of Scripts/reference/make_pixel_goldens.py.
@Suite struct PreprocessingTests {
    let decoder = ImageDecoder()
    let preprocessor = CLIPImagePreprocessor()

    /// The processor's float output, rebuilt from the committed 336x336 uint8 golden (the script
    /// asserts this reproduces transformers' output to 1e-6).
    func goldenPixelValues(_ golden: Fixtures.Goldens.Image) throws -> (RGBImage, [Float]) {
        let square = try decoder.decode(contentsOf: Fixtures.pixels.appendingPathComponent(golden.golden_png))
        return (square, preprocessor.normalised(square))
    }

    @Test(arguments: Fixtures.goodImageNames)
    func pixelValuesMatchCLIPImageProcessorWithinTheIssueBound(name: String) throws {
        let golden = try #require(Fixtures.goldens.images[name])
        let (_, expected) = try goldenPixelValues(golden)
        let actual = preprocessor.pixelValues(for: try decoder.decode(contentsOf: Fixtures.image(name)))
        try #require(actual.count == 3 * 336 * 336 && expected.count == actual.count)
        var maxAbs: Float = 0, sumAbs: Double = 0
        for i in 0..<actual.count {
            let d = abs(actual[i] - expected[i])
            maxAbs = max(maxAbs, d)
            sumAbs += Double(d)
        }
        let meanAbs = sumAbs / Double(actual.count)
        #expect(maxAbs <= 0.02, "\(name): max abs \(maxAbs)")
        #expect(meanAbs <= 0.002, "\(name): mean abs \(meanAbs)")
    }

    @Test(arguments: Fixtures.goodImageNames)
    func pixelValuesAreBitIdenticalToTheProcessorOutput(name: String) throws {
        let golden = try #require(Fixtures.goldens.images[name])
        let image = try decoder.decode(contentsOf: Fixtures.image(name))
        let cropped = preprocessor.croppedSquare(for: image)
        let (expectedSquare, _) = try goldenPixelValues(golden)
        #expect(cropped == expectedSquare, "\(name): 8-bit 336x336 image differs from Pillow's")
        #expect(sha256Hex(littleEndianBytes(preprocessor.pixelValues(for: image))) == golden.pixel_values_sha256)
    }

    @Test(arguments: Fixtures.goodImageNames)
    func withoutPaddingPixelValuesAreBitIdenticalToThePlainProcessor(name: String) throws {
        let golden = try #require(Fixtures.goldens.images[name])
        let image = try decoder.decode(contentsOf: Fixtures.image(name))
        let plain = CLIPImagePreprocessor(padToSquare: false)
        #expect(sha256Hex(littleEndianBytes(plain.pixelValues(for: image))) == golden.pixel_values_nopad_sha256, "\(name)")
        #expect(plain.croppedSquare(for: image) == plain.referenceCroppedSquare(for: image))
    }

    @Test func padColourIsRoundedDownCLIPMean() {
        let p = CLIPImagePreprocessor()
        #expect(p.padColor == (122, 116, 104))
    }

    @Test func expandToSquareCentresAsLLaVADoes() {
        // 3 wide, 1 high: pasted at row (3 - 1) // 2 = 1. 1 wide, 4 high: column (4 - 1) // 2 = 1.
        let wide = RGBImage(width: 3, height: 1, filledWith: (1, 2, 3))
        let square = CLIPImagePreprocessor.expandToSquare(wide, fill: (9, 9, 9))
        #expect(square.width == 3 && square.height == 3)
        #expect(Array(square.pixels[0..<9]) == [9, 9, 9, 9, 9, 9, 9, 9, 9])
        #expect(Array(square.pixels[9..<18]) == [1, 2, 3, 1, 2, 3, 1, 2, 3])
        let tall = RGBImage(width: 1, height: 4, filledWith: (1, 2, 3))
        let square2 = CLIPImagePreprocessor.expandToSquare(tall, fill: (9, 9, 9))
        #expect(square2.width == 4)
        #expect(Array(square2.pixels[0..<12]) == [9, 9, 9, 1, 2, 3, 9, 9, 9, 9, 9, 9])
    }

    @Test func outputIsChannelsFirst() {
        let red = RGBImage(width: 5, height: 5, filledWith: (255, 0, 0))
        let values = preprocessor.pixelValues(for: red)
        let plane = 336 * 336
        #expect(values.count == 3 * plane)
        let one = Float((1.0 - 0.48145466) / 0.26862954), zeroG = Float(-0.4578275 / 0.26130258)
        #expect(abs(values[0] - one) < 1e-5 && abs(values[plane - 1] - one) < 1e-5)
        #expect(abs(values[plane] - zeroG) < 1e-5)
    }

    @Test func bicubicCoefficientsSumToOneInFixedPoint() {
        for (input, output) in [(1000, 336), (336, 336), (1, 336), (512, 336), (1600, 336)] {
            let c = PillowResample.coefficients(inputSize: input, outputSize: output)
            for i in 0..<output {
                let sum = (0..<c.count[i]).reduce(0) { $0 + Int(c.weights[i * c.taps + $1]) }
                #expect(abs(sum - (1 << 22)) <= c.count[i], "\(input)->\(output) pixel \(i)")
            }
        }
    }

    @Test func resizingAConstantImageKeepsItConstant() {
        let flat = RGBImage(width: 77, height: 501, filledWith: (10, 128, 250))
        let resized = PillowResample.resize(flat, width: 336, height: 336)
        #expect(resized == RGBImage(width: 336, height: 336, filledWith: (10, 128, 250)))
    }
}

/// The fast path (virtual padding) against the literal one (pad, resize, crop).
@Suite struct FastPathTests {
    let preprocessor = CLIPImagePreprocessor()

    @Test(arguments: Fixtures.goodImageNames)
    func virtualPaddingEqualsExpandToSquareThenResize(name: String) throws {
        let image = try ImageDecoder().decode(contentsOf: Fixtures.image(name))
        #expect(preprocessor.croppedSquare(for: image) == preprocessor.referenceCroppedSquare(for: image))
    }

    @Test func virtualPaddingEqualsTheLiteralPathOnRandomShapes() {
        var rng = SystemRandomNumberGenerator()
        // Both orientations, odd and even differences, up- and downscaling, and side == resolution.
        let shapes = [(1, 2), (2, 1), (3, 336), (336, 200), (335, 17), (700, 699), (40, 90), (1000, 3), (336, 336)]
        for (w, h) in shapes {
            let pixels = (0..<(w * h * 3)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let image = RGBImage(width: w, height: h, pixels: pixels)
            #expect(preprocessor.croppedSquare(for: image) == preprocessor.referenceCroppedSquare(for: image), "\(w)x\(h)")
        }
        let small = CLIPImagePreprocessor(resolution: 7)
        let image = RGBImage(width: 5, height: 3, pixels: (0..<45).map { UInt8($0 * 5) })
        #expect(small.croppedSquare(for: image) == small.referenceCroppedSquare(for: image))
    }
}
