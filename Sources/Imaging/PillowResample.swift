/// Pillow's 8-bit resampling (`Resample.c`, `ImagingResample` with `BICUBIC`), reimplemented:
///
/// - separable: a horizontal pass into an 8-bit intermediate image, then a vertical pass;
///   an axis whose size does not change is not resampled;
/// - per output pixel `i`: `center = (i + 0.5) * scale`, `support = 2 * max(scale, 1)`
///   (the kernel widens when downscaling: antialiasing), taps `xmin = trunc(center - support + 0.5)`
///   clamped to 0 through `trunc(center + support + 0.5)` clamped to the input size, weights
///   `bicubic((x + xmin - center + 0.5) / max(scale, 1))` with a = -0.5, normalised to sum 1;
/// - weights in fixed point with 22 fractional bits, rounded half away from zero; each pass starts
///   its accumulator at 2^21 (so the shift rounds) and clips to 0...255.
enum PillowResample {
    static let precisionBits = 32 - 8 - 2

    /// Fixed-point taps for one axis: for output `i`, input `first[i] ..< first[i] + count[i]`
    /// with weights `weights[i * taps ..< i * taps + count[i]]`.
    struct Coefficients {
        var taps = 0
        var first: [Int] = []
        var count: [Int] = []
        var weights: [Int32] = []
    }

    static func bicubic(_ x: Double) -> Double {
        let a = -0.5
        let x = abs(x)
        if x < 1 { return ((a + 2) * x - (a + 3)) * x * x + 1 }
        if x < 2 { return (((x - 5) * x + 8) * x - 4) * a }
        return 0
    }

    static func coefficients(inputSize: Int, outputSize: Int) -> Coefficients {
        let support0 = 2.0  // bicubic
        let scale = Double(inputSize) / Double(outputSize)
        let filterScale = max(scale, 1)
        let support = support0 * filterScale
        let taps = Int(support.rounded(.up)) * 2 + 1
        var c = Coefficients()
        c.taps = taps
        c.first = [Int](repeating: 0, count: outputSize)
        c.count = [Int](repeating: 0, count: outputSize)
        c.weights = [Int32](repeating: 0, count: outputSize * taps)
        var k = [Double](repeating: 0, count: taps)
        let inverse = 1.0 / filterScale
        for i in 0..<outputSize {
            let center = (Double(i) + 0.5) * scale
            let xmin = max(Int(center - support + 0.5), 0)  // Int() truncates toward zero, as C's (int)
            let xmax = min(Int(center + support + 0.5), inputSize) - xmin
            var sum = 0.0
            for x in 0..<xmax {
                let w = bicubic((Double(x + xmin) - center + 0.5) * inverse)
                k[x] = w
                sum += w
            }
            for x in 0..<xmax {
                let w = sum != 0 ? k[x] / sum : k[x]
                let fixed = w * Double(1 << precisionBits)
                c.weights[i * taps + x] = Int32(fixed < 0 ? (fixed - 0.5).rounded(.towardZero) : (fixed + 0.5).rounded(.towardZero))
            }
            c.first[i] = xmin
            c.count[i] = xmax
        }
        return c
    }

    @inline(__always)
    static func clip8(_ accumulator: Int32) -> UInt8 {
        let v = accumulator >> Int32(precisionBits)
        return v < 0 ? 0 : v > 255 ? 255 : UInt8(v)
    }

    /// Resizes an RGB image to `width` x `height` with Pillow's bicubic filter.
    static func resize(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        var current = image
        if width != current.width {
            current = horizontal(current, width: width)
        }
        if height != current.height {
            current = vertical(current, height: height)
        }
        return current
    }

    static func horizontal(_ image: RGBImage, width outW: Int) -> RGBImage {
        let c = coefficients(inputSize: image.width, outputSize: outW)
        let inStride = image.width * 3, outStride = outW * 3
        var out = [UInt8](repeating: 0, count: outW * image.height * 3)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in 0..<image.height {
                    horizontalRow(UnsafeBufferPointer(rebasing: src[(y * inStride)..<((y + 1) * inStride)]),
                                  into: UnsafeMutableBufferPointer(rebasing: dst[(y * outStride)..<((y + 1) * outStride)]),
                                  coefficients: c)
                }
            }
        }
        return RGBImage(width: outW, height: image.height, pixels: out)
    }

    /// One row of the horizontal pass: `src` is `[inputSize, 3]`, `dst` is `[outputSize, 3]`.
    static func horizontalRow(_ src: UnsafeBufferPointer<UInt8>, into dst: UnsafeMutableBufferPointer<UInt8>,
                              coefficients c: Coefficients) {
        let half = Int32(1 << (precisionBits - 1))
        c.weights.withUnsafeBufferPointer { k in
            c.first.withUnsafeBufferPointer { first in
                c.count.withUnsafeBufferPointer { count in
                    for x in 0..<count.count {
                        var r = half, g = half, b = half
                        let base = x * c.taps
                        var p = first[x] * 3
                        for t in 0..<count[x] {
                            let w = k[base + t]
                            r &+= Int32(src[p]) &* w
                            g &+= Int32(src[p + 1]) &* w
                            b &+= Int32(src[p + 2]) &* w
                            p += 3
                        }
                        dst[3 * x] = clip8(r); dst[3 * x + 1] = clip8(g); dst[3 * x + 2] = clip8(b)
                    }
                }
            }
        }
    }

    /// The same result as `resize(paddedCanvas, width:height:)` where `paddedCanvas` is
    /// `canvasWidth` x `canvasHeight` filled with `fill` and `image` pasted at (`left`, `top`),
    /// without building the canvas: the horizontal pass runs once for all fill-only rows and once
    /// per image row. This is how expand2square + resize runs; `resize` on a materialised canvas
    /// is the plain version it is tested against.
    static func resizePadded(_ image: RGBImage, canvasWidth: Int, canvasHeight: Int, left: Int, top: Int,
                             fill: (UInt8, UInt8, UInt8), width outW: Int, height outH: Int) -> RGBImage {
        precondition(left >= 0 && top >= 0 && left + image.width <= canvasWidth && top + image.height <= canvasHeight)
        let fillRow = RGBImage(width: canvasWidth, height: 1, filledWith: fill)
        let rowStride = outW * 3
        var intermediate = [UInt8](repeating: 0, count: canvasHeight * rowStride)
        let c = coefficients(inputSize: canvasWidth, outputSize: outW)
        let resizeRows = outW != canvasWidth
        var canvasRow = fillRow.pixels  // one canvas row: fill, then the image's pixels
        intermediate.withUnsafeMutableBufferPointer { dst in
            func emit(_ row: UnsafeBufferPointer<UInt8>, at y: Int) {
                let target = UnsafeMutableBufferPointer(rebasing: dst[(y * rowStride)..<((y + 1) * rowStride)])
                if resizeRows {
                    horizontalRow(row, into: target, coefficients: c)
                } else {
                    for i in 0..<rowStride { target[i] = row[i] }
                }
            }
            // Fill-only rows all resample to the same row: compute it once, copy it.
            let firstFill = top > 0 ? 0 : top + image.height < canvasHeight ? top + image.height : nil
            if let firstFill {
                canvasRow.withUnsafeBufferPointer { emit($0, at: firstFill) }
                for y in 0..<canvasHeight where y != firstFill && (y < top || y >= top + image.height) {
                    for i in 0..<rowStride { dst[y * rowStride + i] = dst[firstFill * rowStride + i] }
                }
            }
            image.pixels.withUnsafeBufferPointer { src in
                canvasRow.withUnsafeMutableBufferPointer { row in
                    let width3 = image.width * 3
                    for y in 0..<image.height {
                        let imageRow = UnsafeBufferPointer(rebasing: src[(y * width3)..<((y + 1) * width3)])
                        if image.width == canvasWidth {
                            emit(imageRow, at: top + y)  // no padding columns: use the row in place
                        } else {
                            _ = UnsafeMutableBufferPointer(rebasing: row[(left * 3)..<(left * 3 + width3)])
                                .update(fromContentsOf: imageRow)
                            emit(UnsafeBufferPointer(row), at: top + y)
                        }
                    }
                }
            }
        }
        let rows = RGBImage(width: outW, height: canvasHeight, pixels: intermediate)
        return outH == canvasHeight ? rows : vertical(rows, height: outH)
    }

    static func vertical(_ image: RGBImage, height outH: Int) -> RGBImage {
        let c = coefficients(inputSize: image.height, outputSize: outH)
        let w = image.width
        let stride = w * 3
        var out = [UInt8](repeating: 0, count: w * outH * 3)
        let half = Int32(1 << (precisionBits - 1))
        var accumulator = [Int32](repeating: 0, count: stride)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                accumulator.withUnsafeMutableBufferPointer { acc in
                    for y in 0..<outH {
                        for i in 0..<stride { acc[i] = half }
                        let base = y * c.taps
                        for t in 0..<c.count[y] {
                            let wgt = c.weights[base + t]
                            let row = (c.first[y] + t) * stride
                            for i in 0..<stride { acc[i] &+= Int32(src[row + i]) &* wgt }
                        }
                        let o = y * stride
                        for i in 0..<stride { dst[o + i] = clip8(acc[i]) }
                    }
                }
            }
        }
        return RGBImage(width: w, height: outH, pixels: out)
    }
}
