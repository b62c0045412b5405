/// LLaVA-1.5's image preprocessing with `image_aspect_ratio = "pad"`: `expand2square`, then
/// `CLIPImageProcessor` on its Pillow path (`use_fast=False`), configured as
/// `openai/clip-vit-large-patch14-336`:
///
/// 1. pad to a square of side `max(width, height)` filled with `padColor`, the image pasted at
///    `(0, (w - h) // 2)` (landscape) or `((h - w) // 2, 0)` (portrait), as LLaVA's `expand2square`;
/// 2. resize the shortest edge to `resolution` (the other to `Int(resolution * long / short)`)
///    with Pillow's bicubic filter (see `PillowResample`);
/// 3. centre-crop `resolution` x `resolution` at `((h - r) // 2, (w - r) // 2)`;
/// 4. `x = Float(Double(v) * (1 / 255))`, then `(x - mean) / std` in `Float`, as transformers'
///    `rescale` and `normalize` compute it;
/// 5. lay out channels first.
public struct CLIPImagePreprocessor: Sendable {
    /// Side of the square the vision tower takes (336 for CLIP ViT-L/14-336).
    public var resolution: Int
    /// Per-channel mean and standard deviation, RGB order (OpenAI CLIP's by default).
    public var mean: [Double]
    public var std: [Double]
    /// The fill of `expand2square`: LLaVA passes `tuple(int(x * 255) for x in image_mean)`.
    public var padColor: (UInt8, UInt8, UInt8)
    /// Step 1 on or off: LLaVA pads when `image_aspect_ratio` is "pad" (LLaVA-1.5); without it
    /// (llava-hf's plain CLIPImageProcessor) the image is resized and centre-cropped directly.
    public var padToSquare: Bool

    public static let openAICLIPMean = [0.48145466, 0.4578275, 0.40821073]
    public static let openAICLIPStd = [0.26862954, 0.26130258, 0.27577711]

    public init(resolution: Int = 336, mean: [Double] = Self.openAICLIPMean, std: [Double] = Self.openAICLIPStd,
                padColor: (UInt8, UInt8, UInt8)? = nil, padToSquare: Bool = true) {
        precondition(resolution > 0 && mean.count == 3 && std.count == 3, "three channels, positive resolution")
        self.resolution = resolution
        self.padToSquare = padToSquare
        self.mean = mean
        self.std = std
        self.padColor = padColor ?? (UInt8(clamping: Int(mean[0] * 255)), UInt8(clamping: Int(mean[1] * 255)), UInt8(clamping: Int(mean[2] * 255)))
    }

    /// The model input for one image: `[3, resolution, resolution]` float32, channels first
    /// (index `(c * resolution + y) * resolution + x`), normalised.
    public func pixelValues(for image: RGBImage) -> [Float] {
        normalised(croppedSquare(for: image))
    }

    /// Steps 1-3: the `resolution` x `resolution` 8-bit image before rescaling and normalising
    /// (the stage the parity goldens store).
    public func croppedSquare(for image: RGBImage) -> RGBImage {
        guard padToSquare else {
            let (w, h) = resizedSize(width: image.width, height: image.height)
            return Self.centreCrop(PillowResample.resize(image, width: w, height: h), width: resolution, height: resolution)
        }
        // The padded square is never built: the resampler treats the padding as virtual rows and
        // columns of `padColor`. `referenceCroppedSquare` is the literal version, kept for tests.
        let side = max(image.width, image.height)
        let (left, top) = Self.pastePosition(width: image.width, height: image.height)
        let (w, h) = resizedSize(width: side, height: side)
        let resized = PillowResample.resizePadded(image, canvasWidth: side, canvasHeight: side, left: left, top: top,
                                                  fill: padColor, width: w, height: h)
        return Self.centreCrop(resized, width: resolution, height: resolution)
    }

    /// Steps 1-3 done literally: `expandToSquare`, `PillowResample.resize`, `centreCrop`. The same
    /// result as `croppedSquare(for:)`, slower; the plain version tests and benchmarks compare with.
    public func referenceCroppedSquare(for image: RGBImage) -> RGBImage {
        let square = padToSquare ? Self.expandToSquare(image, fill: padColor) : image
        let (w, h) = resizedSize(width: square.width, height: square.height)
        return Self.centreCrop(PillowResample.resize(square, width: w, height: h), width: resolution, height: resolution)
    }

    /// transformers' `get_resize_output_image_size` for `{"shortest_edge": resolution}`.
    func resizedSize(width: Int, height: Int) -> (width: Int, height: Int) {
        let short = min(width, height), long = max(width, height)
        let longSide = Int(Double(resolution) * Double(long) / Double(short))
        return width <= height ? (resolution, longSide) : (longSide, resolution)
    }

    /// Where `expand2square` pastes a `width` x `height` image in its square.
    static func pastePosition(width: Int, height: Int) -> (left: Int, top: Int) {
        width > height ? (0, (width - height) / 2) : ((height - width) / 2, 0)
    }

    /// Steps 4-5 on an 8-bit RGB image: `[3, height, width]` float32.
    public func normalised(_ image: RGBImage) -> [Float] {
        // 256 possible inputs per channel: a table computed exactly as transformers does.
        var table = [Float](repeating: 0, count: 3 * 256)
        for c in 0..<3 {
            let m = Float(mean[c]), s = Float(std[c])
            for v in 0..<256 {
                let x = Float(Double(v) * (1.0 / 255.0))
                table[c * 256 + v] = (x - m) / s
            }
        }
        let plane = image.width * image.height
        var out = [Float](repeating: 0, count: 3 * plane)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<plane {
                    dst[i] = table[Int(src[3 * i])]
                    dst[plane + i] = table[256 + Int(src[3 * i + 1])]
                    dst[2 * plane + i] = table[512 + Int(src[3 * i + 2])]
                }
            }
        }
        return out
    }

    /// LLaVA's `expand2square`.
    public static func expandToSquare(_ image: RGBImage, fill: (UInt8, UInt8, UInt8)) -> RGBImage {
        let w = image.width, h = image.height
        if w == h { return image }
        let side = max(w, h)
        var square = RGBImage(width: side, height: side, filledWith: fill)
        let (left, top) = pastePosition(width: w, height: h)
        image.pixels.withUnsafeBufferPointer { src in
            square.pixels.withUnsafeMutableBufferPointer { dst in
                for y in 0..<h {
                    let s = y * w * 3, d = ((top + y) * side + left) * 3
                    for i in 0..<(w * 3) { dst[d + i] = src[s + i] }
                }
            }
        }
        return square
    }

    /// transformers' `center_crop` for a crop no larger than the image.
    static func centreCrop(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        if image.width == width && image.height == height { return image }
        precondition(width <= image.width && height <= image.height)
        let top = (image.height - height) / 2, left = (image.width - width) / 2
        var out = [UInt8](repeating: 0, count: width * height * 3)
        for y in 0..<height {
            let s = ((top + y) * image.width + left) * 3
            out.replaceSubrange((y * width * 3)..<((y + 1) * width * 3), with: image.pixels[s..<(s + width * 3)])
        }
        return RGBImage(width: width, height: height, pixels: out)
    }
}
