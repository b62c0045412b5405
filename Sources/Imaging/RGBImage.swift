/// An 8-bit RGB image, rows top to bottom, pixels interleaved: `pixels` is `[height, width, 3]`
/// (HWC), `pixels[(y * width + x) * 3 + c]`, c = 0 red, 1 green, 2 blue.
///
/// This is what Pillow's `Image.open(path).convert("RGB")` holds, and what LLaVA hands to
/// `expand2square`.
public struct RGBImage: Equatable, Sendable {
    public let width: Int
    public let height: Int
    /// `[height, width, 3]`, row-major.
    public internal(set) var pixels: [UInt8]

    public init(width: Int, height: Int, pixels: [UInt8]) {
        precondition(width > 0 && height > 0, "an image has at least one pixel")
        precondition(pixels.count == width * height * 3, "pixels must be [height, width, 3]")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    /// An image of one colour.
    public init(width: Int, height: Int, filledWith colour: (UInt8, UInt8, UInt8)) {
        var pixels = [UInt8](repeating: 0, count: width * height * 3)
        for i in 0..<(width * height) {
            pixels[3 * i] = colour.0
            pixels[3 * i + 1] = colour.1
            pixels[3 * i + 2] = colour.2
        }
        self.init(width: width, height: height, pixels: pixels)
    }
}
