// RGB images to PNG (libspng) and JPEG (TurboJPEG) bytes: the kept-patch overlays of `generate --kept-patches` and
// the thumbnails of `dllava report`.
import CJPEG
import CPNG
import Foundation

public struct ImageEncodingError: Error, CustomStringConvertible {
    public var format: String
    public var reason: String
    public var description: String { "cannot encode a \(format) image: \(reason)" }
}

extension RGBImage {
    /// The image as an 8-bit RGB PNG.
    public func pngData() throws(ImageEncodingError) -> Data {
        guard let context = spng_ctx_new(Int32(SPNG_CTX_ENCODER.rawValue)) else { throw ImageEncodingError(format: "PNG", reason: "no libspng context") }
        defer { spng_ctx_free(context) }
        func fail(_ status: Int32) -> ImageEncodingError { ImageEncodingError(format: "PNG", reason: String(cString: spng_strerror(status))) }
        var status = spng_set_option(context, SPNG_ENCODE_TO_BUFFER, 1)
        if status != 0 { throw fail(status) }
        var header = spng_ihdr()
        header.width = UInt32(width)
        header.height = UInt32(height)
        header.bit_depth = 8
        header.color_type = UInt8(SPNG_COLOR_TYPE_TRUECOLOR.rawValue)
        status = spng_set_ihdr(context, &header)
        if status != 0 { throw fail(status) }
        status = pixels.withUnsafeBytes { spng_encode_image(context, $0.baseAddress, $0.count, Int32(SPNG_FMT_PNG.rawValue), Int32(SPNG_ENCODE_FINALIZE.rawValue)) }
        if status != 0 { throw fail(status) }
        var length = 0
        var error: Int32 = 0
        guard let buffer = spng_get_png_buffer(context, &length, &error) else { throw fail(error) }
        defer { free(buffer) }
        return Data(bytes: buffer, count: length)
    }

    /// The image as a baseline JPEG (4:2:0), `quality` 1 to 100.
    public func jpegData(quality: Int = 80) throws(ImageEncodingError) -> Data {
        guard let handle = tjInitCompress() else { throw ImageEncodingError(format: "JPEG", reason: "no TurboJPEG handle") }
        defer { tjDestroy(handle) }
        var buffer: UnsafeMutablePointer<UInt8>? = nil
        var length: UInt = 0
        let status = pixels.withUnsafeBufferPointer {
            tjCompress2(handle, $0.baseAddress, Int32(width), 0, Int32(height), Int32(TJPF_RGB.rawValue), &buffer, &length,
                        Int32(TJSAMP_420.rawValue), Int32(max(1, min(100, quality))), 0)
        }
        defer { if let buffer { tjFree(buffer) } }
        guard status == 0, let buffer else { throw ImageEncodingError(format: "JPEG", reason: String(cString: tjGetErrorStr2(handle))) }
        return Data(bytes: buffer, count: Int(length))
    }
}
