import Foundation

/// The byte shuffle of Blosc and HDF5: for elements of `width` bytes, byte 0 of every element, then byte 1 of
/// every element, and so on. The sign and exponent bytes of neighbouring floats are alike, so the shuffled bytes
/// compress better than the floats as they lie. Trailing bytes that do not fill an element stay at the end as
/// they are. A plain loop: the shuffle is not the cost of a snapshot (docs/PERFORMANCE.md, "KV snapshots").
public enum ByteShuffle {
    /// `data` `[count, width]` -> `[width, count]`, byte for byte, then the trailing bytes.
    public static func shuffle(_ data: Data, width: Int) -> Data {
        transpose(data, width: width, shuffling: true)
    }

    /// The inverse of `shuffle`: `unshuffle(shuffle(x, width: w), width: w) == x`.
    public static func unshuffle(_ data: Data, width: Int) -> Data {
        transpose(data, width: width, shuffling: false)
    }

    private static func transpose(_ data: Data, width: Int, shuffling: Bool) -> Data {
        precondition(width >= 1, "ByteShuffle: the element width must be at least 1")
        let count = data.count / width
        var output = Data(count: data.count)
        output.withUnsafeMutableBytes { (destination: UnsafeMutableRawBufferPointer) in
            data.withUnsafeBytes { (source: UnsafeRawBufferPointer) in
                let from = source.bindMemory(to: UInt8.self), to = destination.bindMemory(to: UInt8.self)
                for byte in 0..<width {
                    if shuffling {
                        for element in 0..<count { to[byte * count + element] = from[element * width + byte] }
                    } else {
                        for element in 0..<count { to[element * width + byte] = from[byte * count + element] }
                    }
                }
                for tail in count * width ..< data.count { to[tail] = from[tail] }
            }
        }
        return output
    }
}
