import Foundation
import Testing
@testable import Imaging

/// Deterministic random numbers, so a failing corruption is reproducible.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Leading bytes of formats the decoder does not read, and the name it gives them.
let otherFormats: [([UInt8], String)] = {
    let gif89: [UInt8] = Array("GIF89a".utf8) + [1, 0, 1, 0, 0, 0, 0]
    let gif87: [UInt8] = Array("GIF87a".utf8) + [1, 0, 1, 0]
    let tiffLittle: [UInt8] = [0x49, 0x49, 0x2A, 0x00, 8, 0, 0, 0]
    let tiffBig: [UInt8] = [0x4D, 0x4D, 0x00, 0x2A, 0, 0, 0, 8]
    let webp: [UInt8] = Array("RIFF".utf8) + [0x24, 0, 0, 0] + Array("WEBPVP8 ".utf8)
    return [(gif89, "GIF"), (gif87, "GIF"), (tiffLittle, "TIFF"), (tiffBig, "TIFF"), (webp, "WebP")]
}()

/// Every bad input gives a typed error naming the file; nothing crashes or allocates by the
/// header's say-so.
@Suite struct BadInputTests {
    let decoder = ImageDecoder()

    func decodingError(_ url: URL, with decoder: ImageDecoder = ImageDecoder()) -> ImageError? {
        do {
            _ = try decoder.decode(contentsOf: url)
            return nil
        } catch {
            return error
        }
    }

    func decodingError(_ bytes: [UInt8], name: String, with decoder: ImageDecoder = ImageDecoder()) -> ImageError? {
        do {
            _ = try decoder.decode(data: Data(bytes), name: name)
            return nil
        } catch {
            return error
        }
    }

    @Test(arguments: [
        ("bad_empty.png", ImageError.Kind.empty),
        ("bad_not_an_image.jpg", .notAnImage),
        ("bad_truncated.jpg", .truncated),
    ])
    func sampleBadFilesGiveTheirTypedError(name: String, kind: ImageError.Kind) throws {
        let error = try #require(decodingError(Fixtures.image(name)))
        #expect(error.kind == kind)
        #expect(error.file.hasSuffix(name))
        #expect(error.description.contains(name))
        #expect(error.exitCode == 65)
    }

    @Test func everySampleBadFileIsCovered() throws {
        let bad = try FileManager.default.contentsOfDirectory(atPath: Fixtures.images.path).filter { $0.hasPrefix("bad_") }
        #expect(Set(bad) == ["bad_empty.png", "bad_not_an_image.jpg", "bad_truncated.jpg"])
    }

    @Test(arguments: otherFormats)
    func otherFormatsAreRejectedAsUnsupported(bytes: [UInt8], format: String) throws {
        let error = try #require(decodingError(bytes, name: "picture.jpg"))
        #expect(error.kind == .unsupportedFormat(format))
        let description = error.description
        #expect(description.contains("picture.jpg"))
        #expect(description.contains(format))
    }

    @Test func tooManyPixelsIsRejectedFromTheHeader() throws {
        let small = ImageDecoder(options: .init(maxPixels: 100_000))
        let jpeg = try #require(decodingError(Fixtures.image("rocket.jpg"), with: small))
        #expect(jpeg.kind == .tooLarge(width: 640, height: 427, maxPixels: 100_000))
        #expect(jpeg.description.contains("rocket.jpg"))
        let png = try #require(decodingError(Fixtures.image("astronaut.png"), with: small))
        #expect(png.kind == .tooLarge(width: 512, height: 512, maxPixels: 100_000))
        // At the limit is fine.
        #expect(throws: Never.self) { try ImageDecoder(options: .init(maxPixels: 640 * 427)).decode(contentsOf: Fixtures.image("rocket.jpg")) }
    }

    @Test func absurdJPEGDimensionsAreRejectedBeforeDecoding() throws {
        // rocket.jpg with its SOF frame size rewritten to 65000 x 65000 (4.2 gigapixels).
        var bytes = [UInt8](try Data(contentsOf: Fixtures.image("rocket.jpg")))
        let sof = try #require((2..<(bytes.count - 9)).first { bytes[$0] == 0xFF && (bytes[$0 + 1] == 0xC0 || bytes[$0 + 1] == 0xC2) })
        bytes[sof + 5] = 0xFD; bytes[sof + 6] = 0xE8; bytes[sof + 7] = 0xFD; bytes[sof + 8] = 0xE8
        let error = try #require(decodingError(bytes, name: "huge.jpg"))
        #expect(error.kind == .tooLarge(width: 65000, height: 65000, maxPixels: 100_000_000))
    }

    @Test func absurdPNGDimensionsAreRejectedBeforeDecoding() throws {
        var ihdr = Array("IHDR".utf8)
        ihdr += [0x00, 0x01, 0x86, 0xA0, 0x00, 0x01, 0x86, 0xA0, 8, 2, 0, 0, 0]  // 100000 x 100000 RGB8
        let crc = crc32(ihdr)
        var bytes: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13] + ihdr
        bytes += [UInt8(crc >> 24), UInt8(crc >> 16 & 0xFF), UInt8(crc >> 8 & 0xFF), UInt8(crc & 0xFF)]
        let error = try #require(decodingError(bytes, name: "huge.png"))
        #expect(error.kind == .tooLarge(width: 100_000, height: 100_000, maxPixels: 100_000_000))
    }

    @Test func truncatedPNGsAreReportedAsTruncated() throws {
        let whole = [UInt8](try Data(contentsOf: Fixtures.image("chelsea.png")))
        for length in [3, 20, 40, whole.count / 3, whole.count / 2] {
            let prefix = Array(whole.prefix(length))
            let error = decodingError(prefix, name: "cut.png")
            #expect(error?.kind == .truncated, "length \(length): \(String(describing: error))")
        }
    }

    @Test func aPNGMissingOnlyItsTrailerStillDecodesAsPillowAllows() throws {
        // Pillow stops reading after the image data; a lost IEND (and CRC) does not fail it.
        let whole = [UInt8](try Data(contentsOf: Fixtures.image("chelsea.png")))
        let complete = try ImageDecoder().decode(data: Data(whole), name: "whole.png")
        let cut = Array(whole.dropLast(13))
        let image = try ImageDecoder().decode(data: Data(cut), name: "cut.png")
        #expect(image == complete)
    }

    @Test func truncatedJPEGHeadersAreReportedAsTruncated() throws {
        let whole = [UInt8](try Data(contentsOf: Fixtures.image("rocket.jpg")))
        for length in [1, 2, 200] {
            let prefix = Array(whole.prefix(length))
            let error = decodingError(prefix, name: "cut.jpg")
            #expect(error?.kind == .truncated, "length \(length): \(String(describing: error))")
        }
    }

    @Test func aCorruptedPNGChunkIsReportedAsCorrupt() throws {
        var bytes = [UInt8](try Data(contentsOf: Fixtures.image("coffee.png")))
        bytes[bytes.count / 2] ^= 0xFF  // inside IDAT: the CRC no longer matches
        let error = try #require(decodingError(bytes, name: "flipped.png"))
        guard case .corrupt = error.kind else {
            Issue.record("expected .corrupt, got \(error)")
            return
        }
        #expect(error.description.contains("flipped.png"))
    }

    @Test func randomBytesAfterAJPEGSignatureNeverCrash() throws {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let length = Int.random(in: 3...600, using: &generator)
            var bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &generator) }
            bytes[0] = 0xFF; bytes[1] = 0xD8; bytes[2] = 0xFF
            #expect(decodingError(bytes, name: "noise.jpg") != nil)
        }
    }

    @Test(arguments: ["rocket.jpg", "chelsea_progressive.jpg", "coffee_cmyk.jpg", "camera_gray.jpg", "horse.png", "astronaut_palette.png", "coffee_gray16.png"])
    func corruptedSampleFilesGiveAnImageOrATypedErrorNeverACrash(name: String) throws {
        let original = [UInt8](try Data(contentsOf: Fixtures.image(name)))
        let reference = try ImageDecoder().decode(data: Data(original), name: name)
        var rng = SplitMix64(seed: 0x1A9E5 &+ UInt64(original.count))
        var failures = 0
        for round in 0..<40 {
            var bytes = original
            // A few random byte changes, sometimes a cut as well.
            for _ in 0..<(1 + Int(rng.next() % 8)) {
                let i = 8 + Int(rng.next() % UInt64(bytes.count - 8))
                bytes[i] = UInt8(truncatingIfNeeded: rng.next())
            }
            if round % 5 == 0 { bytes.removeLast(Int(rng.next() % UInt64(bytes.count / 2))) }
            do {
                let image = try decoder.decode(data: Data(bytes), name: "mutated-\(name)")
                // Damage inside entropy-coded data can still decode (libjpeg warns, Pillow accepts).
                #expect(image.pixels.count == image.width * image.height * 3)
                #expect(image.width * image.height <= 4 * reference.width * reference.height)
            } catch {
                failures += 1
                #expect(error.file == "mutated-\(name)")
            }
        }
        #expect(failures > 0, "40 corruptions of \(name) all decoded: the checks are not working")
    }

    @Test func aMissingFileIsUnreadable() throws {
        let error = try #require(decodingError(Fixtures.image("no_such_file.png")))
        guard case .unreadable = error.kind else {
            Issue.record("expected .unreadable, got \(error)")
            return
        }
        #expect(error.description.contains("no_such_file.png"))
    }
}
