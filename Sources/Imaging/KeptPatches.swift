/// The image tokens a Dynamic-LLaVA request kept, drawn over the image the vision tower saw: each image token is one
/// patch of a `grid` x `grid` tiling of that square image (row-major, as CLIP lays out its patch embeddings), so the
/// dropped patches are darkened and the kept ones keep their pixels, with a light outline around the kept region.
public enum KeptPatches {
    /// Darkening of a dropped patch: its pixels keep this share of their value.
    static let droppedBrightness = 0.3

    /// `square` (the preprocessed model input, e.g. `CLIPImagePreprocessor.croppedSquare`) with the patches not in
    /// `kept` darkened. `kept` holds indices into `0 ..< grid * grid`; others are ignored.
    public static func overlay(_ square: RGBImage, grid: Int, kept: [Int]) -> RGBImage {
        precondition(grid > 0, "a grid of at least one patch")
        var isKept = [Bool](repeating: false, count: grid * grid)
        for index in kept where index >= 0 && index < isKept.count { isKept[index] = true }
        var pixels = square.pixels
        let w = square.width, h = square.height
        func patch(_ x: Int, _ y: Int) -> Int { min(grid - 1, y * grid / h) * grid + min(grid - 1, x * grid / w) }
        for y in 0..<h {
            for x in 0..<w {
                let p = patch(x, y), offset = (y * w + x) * 3
                if !isKept[p] {
                    for c in 0..<3 { pixels[offset + c] = UInt8(Double(pixels[offset + c]) * droppedBrightness) }
                } else {
                    // Outline: a kept pixel whose neighbour lies in a dropped patch (or outside the image).
                    let border = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)].contains { nx, ny in
                        nx < 0 || ny < 0 || nx >= w || ny >= h || !isKept[patch(nx, ny)]
                    }
                    if border { pixels[offset] = 255; pixels[offset + 1] = 214; pixels[offset + 2] = 0 }
                }
            }
        }
        return RGBImage(width: w, height: h, pixels: pixels)
    }
}
