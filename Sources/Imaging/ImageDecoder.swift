import Foundation

/// Decodes JPEG and PNG files to RGB the way Pillow's `Image.open(path).convert("RGB")` does,
/// which is how LLaVA-1.5 reads its images.
///
/// - The format comes from the file's first bytes, never from its name.
/// - JPEG goes through TurboJPEG (baseline, progressive, grayscale, CMYK/YCCK with Pillow's Adobe
///   inverted-CMYK convention); PNG through libspng (every colour type and bit depth, with Pillow's
///   conversions: alpha dropped, not composited; 16-bit gray clipped to 255 as Pillow's `I;16`
///   to `RGB` conversion does; other 16-bit samples keep their high byte).
/// - EXIF orientation is ignored unless `applyExifOrientation` is set (LLaVA ignores it).
/// - Bad input throws `ImageError`; the pixel count is checked against `maxPixels` from the header,
///   before any pixel buffer is allocated.
public struct ImageDecoder: Sendable {
    public struct Options: Sendable, Equatable {
        /// Rotate/flip by the EXIF Orientation tag (JPEG APP1 `Exif`, PNG `eXIf`) as Pillow's
        /// `ImageOps.exif_transpose` does. Off by default, as in LLaVA.
        public var applyExifOrientation: Bool
        /// Largest width x height accepted, read from the header before decoding.
        public var maxPixels: Int
        /// Largest file accepted, in bytes (the whole file is read into memory).
        public var maxFileBytes: Int
        /// JPEG only: let TurboJPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as the longer
        /// side stays at least this many pixels. `nil` (the default) decodes at full size, which is
        /// what the parity goldens are made from; see Scripts/reference/README-imaging.md for the
        /// measured cost of enabling it.
        public var jpegMinimumLongSide: Int?

        public init(applyExifOrientation: Bool = false, maxPixels: Int = 100_000_000,
                    maxFileBytes: Int = 1 << 30, jpegMinimumLongSide: Int? = nil) {
            self.applyExifOrientation = applyExifOrientation
            self.maxPixels = maxPixels
            self.maxFileBytes = maxFileBytes
            self.jpegMinimumLongSide = jpegMinimumLongSide
        }
    }

    public var options: Options

    public init(options: Options = Options()) {
        self.options = options
    }

    /// Reads and decodes one file. Errors name the file by its path.
    public func decode(contentsOf url: URL) throws(ImageError) -> RGBImage {
        let name = url.isFileURL ? url.path : url.absoluteString
        let data: Data
        do {
            let attributes = try FileManager.default.attributesOfItem(atPath: url.path)
            if let size = attributes[.size] as? NSNumber, size.intValue > options.maxFileBytes {
                throw ImageError(file: name, kind: .unreadable("file is \(size.intValue) bytes, limit \(options.maxFileBytes)"))
            }
            data = try Data(contentsOf: url)
        } catch let error as ImageError {
            throw error
        } catch {
            throw ImageError(file: name, kind: .unreadable(error.localizedDescription))
        }
        return try decode(data: data, name: name)
    }

    /// Decodes an encoded image held in memory; `name` is used in errors.
    public func decode(data: Data, name: String) throws(ImageError) -> RGBImage {
        let bytes = [UInt8](data)
        return try decode(bytes: bytes, name: name)
    }

    func decode(bytes: [UInt8], name: String) throws(ImageError) -> RGBImage {
        if bytes.isEmpty { throw ImageError(file: name, kind: .empty) }
        if bytes.count > options.maxFileBytes {
            throw ImageError(file: name, kind: .unreadable("\(bytes.count) bytes, limit \(options.maxFileBytes)"))
        }
        var image: RGBImage
        var orientation: Int? = nil
        switch ImageFormat.sniff(bytes) {
        case .jpeg:
            image = try JPEGDecoder(options: options).decode(bytes, name: name)
            if options.applyExifOrientation { orientation = EXIF.orientation(inJPEG: bytes) }
        case .png:
            image = try PNGDecoder(options: options).decode(bytes, name: name)
            if options.applyExifOrientation { orientation = EXIF.orientation(inPNG: bytes) }
        case .prefixOfSupported:
            throw ImageError(file: name, kind: .truncated)
        case .unsupported(let format):
            throw ImageError(file: name, kind: .unsupportedFormat(format))
        case .unknown:
            throw ImageError(file: name, kind: .notAnImage)
        }
        if let orientation, orientation != 1 {
            image = image.oriented(exifOrientation: orientation)
        }
        return image
    }
}

/// What the leading bytes say.
enum ImageFormat: Equatable {
    case jpeg, png
    /// Fewer bytes than a signature, all of them matching JPEG's or PNG's.
    case prefixOfSupported
    case unsupported(String)
    case unknown

    static let pngSignature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
    static let jpegSignature: [UInt8] = [0xFF, 0xD8, 0xFF]

    static func sniff(_ b: [UInt8]) -> ImageFormat {
        func starts(_ sig: [UInt8], at offset: Int = 0) -> Bool {
            b.count >= offset + sig.count && Array(b[offset..<(offset + sig.count)]) == sig
        }
        func ascii(_ s: String, at offset: Int = 0) -> Bool { starts(Array(s.utf8), at: offset) }
        if starts(jpegSignature) { return .jpeg }
        if starts(pngSignature) { return .png }
        if b.count < pngSignature.count,
           Array(pngSignature.prefix(b.count)) == b || Array(jpegSignature.prefix(b.count)) == b {
            return .prefixOfSupported
        }
        if ascii("GIF87a") || ascii("GIF89a") { return .unsupported("GIF") }
        if starts([0x49, 0x49, 0x2A, 0x00]) || starts([0x4D, 0x4D, 0x00, 0x2A])
            || starts([0x49, 0x49, 0x2B, 0x00]) || starts([0x4D, 0x4D, 0x00, 0x2B]) { return .unsupported("TIFF") }
        if ascii("RIFF") && ascii("WEBP", at: 8) { return .unsupported("WebP") }
        if ascii("BM") && b.count >= 14 { return .unsupported("BMP") }
        if ascii("ftyp", at: 4) && (ascii("heic", at: 8) || ascii("heix", at: 8) || ascii("mif1", at: 8)) {
            return .unsupported("HEIF")
        }
        if ascii("ftypavif", at: 4) { return .unsupported("AVIF") }
        if starts([0x00, 0x00, 0x00, 0x0C, 0x6A, 0x50, 0x20, 0x20]) || starts([0xFF, 0x4F, 0xFF, 0x51]) {
            return .unsupported("JPEG 2000")
        }
        if starts([0xFF, 0x0A]) || starts([0x00, 0x00, 0x00, 0x0C, 0x4A, 0x58, 0x4C, 0x20]) { return .unsupported("JPEG XL") }
        if starts([0x00, 0x00, 0x01, 0x00]) { return .unsupported("ICO") }
        return .unknown
    }
}

extension RGBImage {
    /// The image as displayed under EXIF orientation `orientation` (1...8), the same transposes
    /// Pillow's `ImageOps.exif_transpose` applies. Other values return the image unchanged.
    func oriented(exifOrientation orientation: Int) -> RGBImage {
        let w = width, h = height
        guard (2...8).contains(orientation) else { return self }
        let swaps = orientation >= 5
        let outW = swaps ? h : w, outH = swaps ? w : h
        var out = [UInt8](repeating: 0, count: pixels.count)
        pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in 0..<outH {
                    for x in 0..<outW {
                        let sx: Int, sy: Int
                        switch orientation {
                        case 2: (sx, sy) = (w - 1 - x, y)              // mirror horizontal
                        case 3: (sx, sy) = (w - 1 - x, h - 1 - y)      // rotate 180
                        case 4: (sx, sy) = (x, h - 1 - y)              // mirror vertical
                        case 5: (sx, sy) = (y, x)                      // transpose
                        case 6: (sx, sy) = (y, h - 1 - x)              // rotate 90 clockwise
                        case 7: (sx, sy) = (w - 1 - y, h - 1 - x)      // transverse
                        default: (sx, sy) = (w - 1 - y, x)             // 8: rotate 90 anticlockwise
                        }
                        let s = (sy * w + sx) * 3, d = (y * outW + x) * 3
                        dst[d] = src[s]; dst[d + 1] = src[s + 1]; dst[d + 2] = src[s + 2]
                    }
                }
            }
        }
        return RGBImage(width: outW, height: outH, pixels: out)
    }
}
