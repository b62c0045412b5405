/// Reads the EXIF Orientation tag (0x0112) from IFD0, without a metadata library.
enum EXIF {
    /// Orientation from a JPEG's first APP1 `Exif\0\0` segment, or nil.
    static func orientation(inJPEG b: [UInt8]) -> Int? {
        var i = 2  // after SOI
        while i + 4 <= b.count {
            guard b[i] == 0xFF else { return nil }
            let marker = b[i + 1]
            if marker == 0xFF { i += 1; continue }  // fill byte
            if marker == 0xD8 || (0xD0...0xD7).contains(marker) || marker == 0x01 { i += 2; continue }
            if marker == 0xDA || marker == 0xD9 { return nil }  // scan data: no more metadata
            let length = Int(b[i + 2]) << 8 | Int(b[i + 3])
            guard length >= 2, i + 2 + length <= b.count else { return nil }
            let body = (i + 4)..<(i + 2 + length)
            if marker == 0xE1, body.count >= 6, Array(b[body.lowerBound..<(body.lowerBound + 6)]) == Array("Exif\0\0".utf8) {
                return orientation(inTIFF: b[(body.lowerBound + 6)..<body.upperBound])
            }
            i += 2 + length
        }
        return nil
    }

    /// Orientation from a PNG's `eXIf` chunk (which holds TIFF data directly), or nil.
    static func orientation(inPNG b: [UInt8]) -> Int? {
        var i = 8
        while i + 12 <= b.count {
            let length = Int(b[i]) << 24 | Int(b[i + 1]) << 16 | Int(b[i + 2]) << 8 | Int(b[i + 3])
            let type = String(decoding: b[(i + 4)..<(i + 8)], as: UTF8.self)
            guard length >= 0, i + 12 + length <= b.count else { return nil }
            if type == "eXIf" { return orientation(inTIFF: b[(i + 8)..<(i + 8 + length)]) }
            if type == "IEND" { return nil }
            i += 12 + length
        }
        return nil
    }

    /// Orientation from TIFF-structured EXIF data: header, IFD0, tag 0x0112 of type SHORT.
    static func orientation(inTIFF t: ArraySlice<UInt8>) -> Int? {
        let t = Array(t)
        guard t.count >= 8 else { return nil }
        let little: Bool
        switch (t[0], t[1]) {
        case (0x49, 0x49): little = true
        case (0x4D, 0x4D): little = false
        default: return nil
        }
        func u16(_ o: Int) -> Int? {
            guard o >= 0, o + 2 <= t.count else { return nil }
            return little ? Int(t[o]) | Int(t[o + 1]) << 8 : Int(t[o]) << 8 | Int(t[o + 1])
        }
        func u32(_ o: Int) -> Int? {
            guard let a = u16(o), let b = u16(o + 2) else { return nil }
            return little ? a | b << 16 : a << 16 | b
        }
        guard u16(2) == 42, let ifd = u32(4), let count = u16(ifd) else { return nil }
        for n in 0..<count {
            let entry = ifd + 2 + 12 * n
            guard let tag = u16(entry), let type = u16(entry + 2) else { return nil }
            if tag == 0x0112 {
                guard type == 3, let value = u16(entry + 8) else { return nil }
                return value
            }
        }
        return nil
    }
}
