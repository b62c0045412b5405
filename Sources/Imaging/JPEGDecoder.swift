import CJPEG

/// JPEG -> RGB with TurboJPEG, reproducing Pillow's `.convert("RGB")`.
///
/// TurboJPEG's defaults (accurate integer IDCT, fancy upsampling) are libjpeg's, which Pillow
/// uses. Pillow reads every 4-component JPEG as Adobe-inverted CMYK (`rawmode "CMYK;I"`) and
/// converts it with `cmyk2rgb`; `cmykToRGB` reproduces both steps on TurboJPEG's raw CMYK output.
struct JPEGDecoder {
    let options: ImageDecoder.Options

    func decode(_ bytes: [UInt8], name: String) throws(ImageError) -> RGBImage {
        guard let handle = tjInitDecompress() else {
            throw ImageError(file: name, kind: .corrupt("cannot initialise TurboJPEG"))
        }
        defer { tjDestroy(handle) }
        var width: Int32 = 0, height: Int32 = 0, subsampling: Int32 = 0, colourspace: Int32 = 0
        let headerStatus = bytes.withUnsafeBufferPointer {
            tjDecompressHeader3(handle, $0.baseAddress, UInt(bytes.count), &width, &height, &subsampling, &colourspace)
        }
        if headerStatus != 0 {
            let message = String(cString: tjGetErrorStr2(handle))
            throw ImageError(file: name, kind: Self.looksTruncated(message, bytes) ? .truncated : .corrupt(message))
        }
        guard width > 0, height > 0 else {
            // libjpeg can report an empty header when the data stops before the frame header.
            throw ImageError(file: name, kind: Self.hasFrameHeader(bytes) ? .corrupt("zero width or height") : .truncated)
        }
        let w = Int(width), h = Int(height)
        if w * h > options.maxPixels {
            throw ImageError(file: name, kind: .tooLarge(width: w, height: h, maxPixels: options.maxPixels))
        }

        let (scaledW, scaledH) = scaledSize(width: width, height: height)
        let cmyk = colourspace == TJCS_CMYK.rawValue || colourspace == TJCS_YCCK.rawValue
        let gray = colourspace == TJCS_GRAY.rawValue
        let format = cmyk ? TJPF_CMYK : gray ? TJPF_GRAY : TJPF_RGB
        let channels = cmyk ? 4 : gray ? 1 : 3
        var raw = [UInt8](repeating: 0, count: scaledW * scaledH * channels)
        let flags = TJFLAG_LIMITSCANS  // bounds the work a hostile progressive file can demand
        let status = bytes.withUnsafeBufferPointer { src in
            raw.withUnsafeMutableBufferPointer { dst in
                tjDecompress2(handle, src.baseAddress, UInt(bytes.count), dst.baseAddress,
                              Int32(scaledW), 0, Int32(scaledH), format.rawValue, flags)
            }
        }
        if status != 0 {
            let message = String(cString: tjGetErrorStr2(handle))
            // libjpeg warnings (e.g. extraneous bytes) leave a complete image, and Pillow accepts
            // them; running out of data does not.
            if tjGetErrorCode(handle) != TJERR_WARNING.rawValue || Self.looksTruncated(message, bytes) {
                throw ImageError(file: name, kind: Self.looksTruncated(message, bytes) ? .truncated : .corrupt(message))
            }
        }
        let rgb: [UInt8]
        if cmyk {
            rgb = Self.cmykToRGB(raw)
        } else if gray {
            rgb = Self.grayToRGB(raw)
        } else {
            rgb = raw
        }
        return RGBImage(width: scaledW, height: scaledH, pixels: rgb)
    }

    /// The decode size: full size, or the smallest TurboJPEG scale keeping the longer side at
    /// least `jpegMinimumLongSide`.
    private func scaledSize(width: Int32, height: Int32) -> (Int, Int) {
        guard let minimum = options.jpegMinimumLongSide else { return (Int(width), Int(height)) }
        var best = (Int(width), Int(height))
        for denominator in [2, 4, 8] {
            // TJSCALED: ceil(dimension * num / denom)
            let w = (Int(width) + denominator - 1) / denominator
            let h = (Int(height) + denominator - 1) / denominator
            if max(w, h) >= minimum { best = (w, h) } else { break }
        }
        return best
    }

    /// Whether the marker segments before the first scan include a frame header (SOFn) that the
    /// data holds completely.
    static func hasFrameHeader(_ b: [UInt8]) -> Bool {
        var i = 2
        while i + 4 <= b.count {
            guard b[i] == 0xFF else { return false }
            let marker = b[i + 1]
            if marker == 0xFF { i += 1; continue }
            if (0xD0...0xD7).contains(marker) || marker == 0x01 { i += 2; continue }
            if marker == 0xDA || marker == 0xD9 { return false }
            let length = Int(b[i + 2]) << 8 | Int(b[i + 3])
            guard i + 2 + length <= b.count else { return false }
            if (0xC0...0xCF).contains(marker) && marker != 0xC4 && marker != 0xC8 && marker != 0xCC { return true }
            i += 2 + max(length, 2)
        }
        return false
    }

    static func looksTruncated(_ message: String, _ bytes: [UInt8]) -> Bool {
        message.contains("Premature end") || message.contains("premature end")
            || message.contains("insufficient") || bytes.count < 4
    }

    /// Pillow: unpack `CMYK;I` (invert), then `cmyk2rgb`: `nk = 255 - k`,
    /// `out = clip8(nk - muldiv255(c, nk))` with `muldiv255(a, b) = ((a*b+128) >> 8 + a*b+128) >> 8`.
    static func cmykToRGB(_ raw: [UInt8]) -> [UInt8] {
        let n = raw.count / 4
        var out = [UInt8](repeating: 0, count: n * 3)
        raw.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<n {
                    let nk = Int(src[4 * i + 3])  // 255 - (255 - rawK)
                    for c in 0..<3 {
                        let ink = 255 - Int(src[4 * i + c])
                        let t = ink * nk + 128
                        let v = nk - (((t >> 8) + t) >> 8)
                        dst[3 * i + c] = UInt8(clamping: v)
                    }
                }
            }
        }
        return out
    }

    static func grayToRGB(_ gray: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: gray.count * 3)
        gray.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<src.count {
                    let v = src[i]
                    dst[3 * i] = v; dst[3 * i + 1] = v; dst[3 * i + 2] = v
                }
            }
        }
        return out
    }
}
