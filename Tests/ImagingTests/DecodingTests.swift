import Foundation
import Testing
@testable import Imaging

@Suite struct DecodingTests {
    let decoder = ImageDecoder()

    @Test func sha256OfKnownInputsMatchesTheStandard() {
        #expect(sha256Hex(Array("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(sha256Hex([]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    }

    @Test func everyGoodSampleImageHasAGolden() {
        let names = Fixtures.goodImageNames
        #expect(names.count >= 18)
        #expect(Set(names) == Set(Fixtures.goldens.images.keys))
    }

    @Test(arguments: Fixtures.goodImageNames)
    func decodedPixelsEqualPillowsConvertRGB(name: String) throws {
        let golden = try #require(Fixtures.goldens.images[name])
        let image = try decoder.decode(contentsOf: Fixtures.image(name))
        #expect(image.width == golden.width && image.height == golden.height)
        #expect(sha256Hex(image.pixels) == golden.decoded_rgb_sha256, "\(name) (\(golden.mode)) decodes differently from Pillow")
    }

    @Test(arguments: Fixtures.goldens.synthetic.keys.sorted())
    func everyPNGColourTypeBitDepthAndInterlaceAndYCCKJPEGConvertsAsPillowDoes(name: String) throws {
        let golden = try #require(Fixtures.goldens.synthetic[name])
        let image = try decoder.decode(contentsOf: Fixtures.pixels.appendingPathComponent("synthetic/\(name)"))
        #expect(image.width == golden.width && image.height == golden.height)
        #expect(image.pixels == hexBytes(golden.rgb_hex), "\(name) (Pillow mode \(golden.mode))")
    }

    @Test func jpegDecodeTimeScalingKeepsTheLongSideAtTheRequestedMinimum() throws {
        let scaling = ImageDecoder(options: .init(jpegMinimumLongSide: 336))
        let hubble = try scaling.decode(contentsOf: Fixtures.image("hubble_deep_field.jpg"))
        #expect(hubble.width == 500 && hubble.height == 436)  // 1/2; 1/4 would give 250 < 336
        let rocket = try scaling.decode(contentsOf: Fixtures.image("rocket.jpg"))
        #expect(rocket == (try decoder.decode(contentsOf: Fixtures.image("rocket.jpg"))))  // 640 / 2 < 336: full size
        let png = try scaling.decode(contentsOf: Fixtures.image("astronaut.png"))
        #expect(png.width == 512)  // PNG is never scaled
    }

    @Test func formatComesFromTheBytesNotTheName() throws {
        let png = try Data(contentsOf: Fixtures.image("one_pixel.png"))
        let image = try decoder.decode(data: png, name: "misnamed.jpg")
        #expect(image.width == 1 && image.height == 1)
    }

    @Test func exifOrientationIsIgnoredByDefaultAndAppliedOnRequest() throws {
        let name = "rocket_exif_rot90.jpg"
        let golden = try #require(Fixtures.goldens.images[name])
        let transposed = try #require(golden.exif_transposed)
        #expect(golden.exif_orientation == 6)

        let asStored = try decoder.decode(contentsOf: Fixtures.image(name))
        #expect(asStored.width == 640 && asStored.height == 427)

        let upright = try ImageDecoder(options: .init(applyExifOrientation: true)).decode(contentsOf: Fixtures.image(name))
        #expect(upright.width == transposed.width && upright.height == transposed.height)
        #expect(sha256Hex(upright.pixels) == transposed.rgb_sha256)
        // Orientation 6 = rotate 90 degrees clockwise: the stored bottom-left pixel is now top-left.
        #expect(Array(upright.pixels[0..<3]) == Array(asStored.pixels[(426 * 640 * 3)..<(426 * 640 * 3 + 3)]))
    }

    @Test func pngEXIfOrientationIsAppliedOnRequest() throws {
        let name = "rgb8_exif_orientation8.png"
        let golden = try #require(Fixtures.goldens.synthetic[name])
        let transposed = try #require(golden.exif_transposed)
        #expect(golden.exif_orientation == 8)
        let url = Fixtures.pixels.appendingPathComponent("synthetic/\(name)")
        #expect(try decoder.decode(contentsOf: url).pixels == hexBytes(golden.rgb_hex))
        let upright = try ImageDecoder(options: .init(applyExifOrientation: true)).decode(contentsOf: url)
        #expect(upright.width == transposed.width && upright.height == transposed.height)
        #expect(upright.pixels == hexBytes(transposed.rgb_hex))
    }

    @Test func orientationIsReadFromBothTIFFByteOrders() {
        // IFD0 with two entries (ImageWidth, then Orientation = 3), little- and big-endian.
        let little: [UInt8] = [0x49, 0x49, 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00, 0x02, 0x00,
                               0x00, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00,
                               0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00,
                               0x00, 0x00, 0x00, 0x00]
        let big: [UInt8] = [0x4D, 0x4D, 0x00, 0x2A, 0x00, 0x00, 0x00, 0x08, 0x00, 0x02,
                            0x01, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x40, 0x00, 0x00,
                            0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x03, 0x00, 0x00,
                            0x00, 0x00, 0x00, 0x00]
        #expect(EXIF.orientation(inTIFF: little[...]) == 3)
        #expect(EXIF.orientation(inTIFF: big[...]) == 3)
        #expect(EXIF.orientation(inTIFF: little.prefix(20)) == nil)  // cut inside the entry table
        #expect(EXIF.orientation(inTIFF: [0x49, 0x49, 0x2A, 0x00, 0xFF, 0xFF, 0xFF, 0x7F][...]) == nil)  // IFD offset past the end
    }

    @Test func imagesWithoutOrientationAreUnchangedByTheOption() throws {
        let plain = try decoder.decode(contentsOf: Fixtures.image("rocket.jpg"))
        let withOption = try ImageDecoder(options: .init(applyExifOrientation: true)).decode(contentsOf: Fixtures.image("rocket.jpg"))
        #expect(plain == withOption)
    }

    @Test func allEightOrientationsMapPixelsAsExifTransposeDoes() {
        // 3x2 image with distinct pixels; expected layouts written out by hand.
        let image = RGBImage(width: 3, height: 2, pixels: (0..<6).flatMap { [UInt8($0), 0, 0] })
        func reds(_ i: RGBImage) -> [UInt8] { stride(from: 0, to: i.pixels.count, by: 3).map { i.pixels[$0] } }
        // source:  0 1 2
        //          3 4 5
        #expect(reds(image.oriented(exifOrientation: 1)) == [0, 1, 2, 3, 4, 5])
        #expect(reds(image.oriented(exifOrientation: 2)) == [2, 1, 0, 5, 4, 3])
        #expect(reds(image.oriented(exifOrientation: 3)) == [5, 4, 3, 2, 1, 0])
        #expect(reds(image.oriented(exifOrientation: 4)) == [3, 4, 5, 0, 1, 2])
        #expect(reds(image.oriented(exifOrientation: 5)) == [0, 3, 1, 4, 2, 5])
        #expect(reds(image.oriented(exifOrientation: 6)) == [3, 0, 4, 1, 5, 2])
        #expect(reds(image.oriented(exifOrientation: 7)) == [5, 2, 4, 1, 3, 0])
        #expect(reds(image.oriented(exifOrientation: 8)) == [2, 5, 1, 4, 0, 3])
        #expect(image.oriented(exifOrientation: 6).width == 2)
    }
}
