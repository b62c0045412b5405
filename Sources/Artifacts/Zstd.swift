import CZstd
import Foundation

/// Whole-buffer zstd compression (results and snapshots are small enough to hold in memory).
public enum Zstd {
    /// Compresses `data` into one zstd frame with its content size and a content checksum, so `zstd -d` and
    /// `decompress` detect corruption.
    public static func compress(_ data: Data, level: Int32 = 3) throws -> Data {
        guard let context = ZSTD_createCCtx() else { throw ArtifactError.zstd(operation: "compression", reason: "out of memory") }
        defer { ZSTD_freeCCtx(context) }
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level), "compression")
        try check(ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1), "compression")
        let bound = ZSTD_compressBound(data.count)
        try check(bound, "compression")
        var output = Data(count: bound)
        let written = output.withUnsafeMutableBytes { destination in
            data.withUnsafeBytes { source in
                ZSTD_compress2(context, destination.baseAddress, bound, source.baseAddress, source.count)
            }
        }
        try check(written, "compression")
        output.count = written
        return output
    }

    /// Decompresses one or more concatenated zstd frames, refusing to produce more than `maxSize` bytes.
    public static func decompress(_ data: Data, maxSize: Int = 1 << 30) throws -> Data {
        guard !data.isEmpty else { throw ArtifactError.zstd(operation: "decompression", reason: "the input is empty") }
        guard let context = ZSTD_createDCtx() else { throw ArtifactError.zstd(operation: "decompression", reason: "out of memory") }
        defer { ZSTD_freeDCtx(context) }
        return try data.withUnsafeBytes { source -> Data in
            // The frame header usually records the size: refuse at once what could never fit. It is not trusted for
            // the allocation (a damaged or crafted header could declare gigabytes for a few bytes of input): the
            // buffer starts at what the input could plausibly expand to and grows with what is really produced.
            let declared = ZSTD_getFrameContentSize(source.baseAddress, source.count)
            let known = declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != ZSTD_CONTENTSIZE_ERROR
            if known && declared > UInt64(maxSize) { throw ArtifactError.decompressedSizeLimit(limit: maxSize) }
            var output = [UInt8](repeating: 0, count: initialCapacity(declared: known ? declared : nil, inputBytes: source.count, maxSize: maxSize))
            var produced = 0
            var input = ZSTD_inBuffer(src: source.baseAddress, size: source.count, pos: 0)
            while true {
                if produced == output.count {
                    if output.count > maxSize { throw ArtifactError.decompressedSizeLimit(limit: maxSize) }
                    output += [UInt8](repeating: 0, count: min(output.count, maxSize + 1 - output.count))
                }
                let remaining = try output.withUnsafeMutableBytes { destination -> Int in
                    var out = ZSTD_outBuffer(dst: destination.baseAddress, size: destination.count, pos: produced)
                    let result = ZSTD_decompressStream(context, &out, &input)
                    try check(result, "decompression")
                    produced = out.pos
                    return result
                }
                if produced > maxSize { throw ArtifactError.decompressedSizeLimit(limit: maxSize) }
                if input.pos == input.size {
                    if remaining == 0 { break }
                    // All input consumed, room left for output, and the frame still unfinished: it was cut short.
                    if produced < output.count { throw ArtifactError.truncatedZstd }
                }
            }
            return Data(output[..<produced])
        }
    }

    /// The first output buffer: the declared size when the input could plausibly expand to it (16 times its size, at
    /// least 64 KiB), else that plausible size; the buffer then grows with what is really produced. Never more than
    /// `maxSize + 1`: one byte more than allowed tells "exactly maxSize" from "more".
    static func initialCapacity(declared: UInt64?, inputBytes: Int, maxSize: Int) -> Int {
        let plausible = max(1 << 16, inputBytes.multipliedReportingOverflow(by: 16).partialValue)
        let wanted = declared.map { Int(min($0 + 1, UInt64(plausible))) } ?? (1 << 16)
        return min(wanted, maxSize + 1)
    }

    private static func check(_ code: Int, _ operation: String) throws {
        if ZSTD_isError(code) != 0 {
            throw ArtifactError.zstd(operation: operation, reason: String(cString: ZSTD_getErrorName(code)))
        }
    }
}
