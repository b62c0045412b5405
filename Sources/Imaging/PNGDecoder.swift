import CPNG

/// PNG -> RGB with libspng, reproducing Pillow's `Image.open(...).convert("RGB")` for each colour
/// type and bit depth. libspng hands over the unfiltered, deinterlaced samples as stored
/// (`SPNG_FMT_RAW`, big-endian); the conversions are Pillow's:
///
/// | PNG | Pillow mode | to RGB |
/// |---|---|---|
/// | gray 1/2/4 bit | `1`, `L;2`, `L;4` | scaled to 0...255 (x255, x85, x17), replicated |
/// | gray 8 | `L` | replicated |
/// | gray 16 | `I;16` | clipped to 255 (not scaled!), replicated |
/// | gray+alpha 8/16 | `LA` / `RGBA` via `LA;16B` | high byte of gray, alpha dropped |
/// | RGB 8/16, RGBA 8/16 | `RGB`/`RGBA` | high byte, alpha dropped |
/// | palette 1/2/4/8 (+tRNS) | `P` | palette lookup, transparency ignored |
///
/// No gamma, sBIT or colour-profile handling: Pillow applies none.
struct PNGDecoder {
    let options: ImageDecoder.Options

    func decode(_ bytes: [UInt8], name: String) throws(ImageError) -> RGBImage {
        guard let ctx = spng_ctx_new(0) else { throw ImageError(file: name, kind: .corrupt("cannot create a libspng context")) }
        defer { spng_ctx_free(ctx) }
        // Bound what libspng may allocate for chunks (text, ICC, ...) on hostile input.
        spng_set_chunk_limits(ctx, 64 << 20, 64 << 20)
        spng_set_image_limits(ctx, UInt32(Int32.max), UInt32(Int32.max))

        func fail(_ code: Int32) -> ImageError {
            let message = String(cString: spng_strerror(code))
            let truncatedCodes: [spng_errno] = [SPNG_EOF, SPNG_IO_EOF, SPNG_EIDAT_TOO_SHORT]
            let truncated = truncatedCodes.contains { $0.rawValue == code }
            return ImageError(file: name, kind: truncated ? .truncated : .corrupt(message))
        }

        return try bytes.withUnsafeBufferPointer { (buffer) throws(ImageError) -> RGBImage in
            var status = spng_set_png_buffer(ctx, buffer.baseAddress, buffer.count)
            if status != 0 { throw fail(status) }
            var ihdr = spng_ihdr()
            status = spng_get_ihdr(ctx, &ihdr)
            if status != 0 { throw fail(status) }
            let w = Int(ihdr.width), h = Int(ihdr.height)
            if w * h > options.maxPixels {
                throw ImageError(file: name, kind: .tooLarge(width: w, height: h, maxPixels: options.maxPixels))
            }
            var palette = spng_plte()
            if ihdr.color_type == UInt8(SPNG_COLOR_TYPE_INDEXED.rawValue) {
                status = spng_get_plte(ctx, &palette)
                if status != 0 { throw fail(status) }
            }
            var size = 0
            status = spng_decoded_image_size(ctx, Int32(SPNG_FMT_RAW.rawValue), &size)
            if status != 0 { throw fail(status) }
            var raw = [UInt8](repeating: 0, count: size)
            status = raw.withUnsafeMutableBytes {
                spng_decode_image(ctx, $0.baseAddress, size, Int32(SPNG_FMT_RAW.rawValue), 0)
            }
            if status != 0 { throw fail(status) }
            let rgb = try Self.toRGB(raw: raw, width: w, height: h, ihdr: ihdr, palette: palette, name: name)
            return RGBImage(width: w, height: h, pixels: rgb)
        }
    }

    static func toRGB(raw: [UInt8], width w: Int, height h: Int, ihdr: spng_ihdr, palette: spng_plte,
                      name: String) throws(ImageError) -> [UInt8] {
        let depth = Int(ihdr.bit_depth)
        let channels: Int
        switch UInt32(ihdr.color_type) {
        case SPNG_COLOR_TYPE_GRAYSCALE.rawValue, SPNG_COLOR_TYPE_INDEXED.rawValue: channels = 1
        case SPNG_COLOR_TYPE_GRAYSCALE_ALPHA.rawValue: channels = 2
        case SPNG_COLOR_TYPE_TRUECOLOR.rawValue: channels = 3
        case SPNG_COLOR_TYPE_TRUECOLOR_ALPHA.rawValue: channels = 4
        default: throw ImageError(file: name, kind: .corrupt("colour type \(ihdr.color_type)"))
        }
        let indexed = UInt32(ihdr.color_type) == SPNG_COLOR_TYPE_INDEXED.rawValue
        let rowBytes = (w * channels * depth + 7) / 8
        guard raw.count >= rowBytes * h else { throw ImageError(file: name, kind: .corrupt("short image buffer")) }
        var lut = [UInt8](repeating: 0, count: 256 * 3)
        if indexed {
            // Pillow's palette starts as a gray ramp; PLTE overwrites the first n entries.
            for i in 0..<256 { lut[3 * i] = UInt8(i); lut[3 * i + 1] = UInt8(i); lut[3 * i + 2] = UInt8(i) }
            withUnsafeBytes(of: palette.entries) { entries in
                for i in 0..<min(Int(palette.n_entries), 256) {
                    lut[3 * i] = entries[4 * i]; lut[3 * i + 1] = entries[4 * i + 1]; lut[3 * i + 2] = entries[4 * i + 2]
                }
            }
        }
        var out = [UInt8](repeating: 0, count: w * h * 3)
        raw.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in 0..<h {
                    let row = y * rowBytes
                    let o = y * w * 3
                    if depth < 8 {
                        // Packed samples, most significant bits first; gray or palette index.
                        let mask = (1 << depth) - 1
                        let scale = 255 / mask  // 255, 85, 17: Pillow's 1 / L;2 / L;4 expansion
                        for x in 0..<w {
                            let bit = x * depth
                            let v = (Int(src[row + (bit >> 3)]) >> (8 - depth - (bit & 7))) & mask
                            if indexed {
                                dst[o + 3 * x] = lut[3 * v]; dst[o + 3 * x + 1] = lut[3 * v + 1]; dst[o + 3 * x + 2] = lut[3 * v + 2]
                            } else {
                                let g = UInt8(v * scale)
                                dst[o + 3 * x] = g; dst[o + 3 * x + 1] = g; dst[o + 3 * x + 2] = g
                            }
                        }
                        continue
                    }
                    let bytesPerSample = depth / 8
                    for x in 0..<w {
                        let p = row + x * channels * bytesPerSample
                        if indexed {
                            let v = Int(src[p])
                            dst[o + 3 * x] = lut[3 * v]; dst[o + 3 * x + 1] = lut[3 * v + 1]; dst[o + 3 * x + 2] = lut[3 * v + 2]
                        } else if channels <= 2 {
                            let g: UInt8
                            if depth == 16 && channels == 1 {
                                // Pillow I;16 -> RGB: values above 255 clip to 255.
                                g = src[p] == 0 ? src[p + 1] : 255
                            } else {
                                g = src[p]  // 8-bit value, or the high byte of a 16-bit one
                            }
                            dst[o + 3 * x] = g; dst[o + 3 * x + 1] = g; dst[o + 3 * x + 2] = g
                        } else {
                            dst[o + 3 * x] = src[p]
                            dst[o + 3 * x + 1] = src[p + bytesPerSample]
                            dst[o + 3 * x + 2] = src[p + 2 * bytesPerSample]
                        }
                    }
                }
            }
        }
        return out
    }
}
