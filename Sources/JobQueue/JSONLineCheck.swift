import Foundation

/// Checks a JSONL line's bytes for what JSONDecoder would misreport or let through: bytes that are not UTF-8, a NUL,
/// a `\u0000` or a lone UTF-16 surrogate escape in a string, and a key given twice in the top-level object (JSON
/// leaves duplicates undefined; a manifest must not depend on which one wins).
enum JSONLineCheck {
    static func problem(in line: [UInt8]) -> String? {
        var iterator = line.makeIterator()
        var parser = Unicode.UTF8.ForwardParser()
        var offset = 0
        decoding: while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let scalar): offset += scalar.count
            case .error: return "byte \(offset + 1) is not valid UTF-8 (a manifest must be UTF-8 text)"
            case .emptyInput: break decoding
            }
        }
        if let nul = line.firstIndex(of: 0) { return "byte \(nul + 1) is a NUL character" }
        var depth = 0
        var keys = Set<[UInt8]>()
        var index = 0
        while index < line.count {
            let byte = line[index]
            if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") { depth += 1 }
            if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") { depth -= 1 }
            guard byte == UInt8(ascii: "\"") else { index += 1; continue }
            // A string: scan its escapes up to the closing quote.
            let start = index + 1
            index = start
            var pendingHigh = false
            while index < line.count && line[index] != UInt8(ascii: "\"") {
                guard line[index] == UInt8(ascii: "\\") else {
                    if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                    index += 1
                    continue
                }
                let escaped = index + 1 < line.count ? line[index + 1] : 0
                if escaped == UInt8(ascii: "u"), index + 6 <= line.count,
                   let unit = UInt16(String(decoding: line[index + 2 ..< index + 6], as: UTF8.self), radix: 16) {
                    if unit == 0 { return "a string holds a NUL character (\\u0000)" }
                    if (0xDC00...0xDFFF).contains(unit) {
                        if !pendingHigh { return "a string holds a lone surrogate (a \\uDC00-\\uDFFF escape without its high half)" }
                        pendingHigh = false
                    } else {
                        if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                        pendingHigh = (0xD800...0xDBFF).contains(unit)
                    }
                    index += 6
                } else {
                    if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
                    index += 2
                }
            }
            if pendingHigh { return "a string holds a lone surrogate (a \\uD800-\\uDBFF escape without its low half)" }
            let end = min(index, line.count)
            index += 1
            // A string at depth 1 followed by a colon is a key of the top-level object.
            var next = index
            while next < line.count && (line[next] == 0x20 || line[next] == 0x09) { next += 1 }
            if depth == 1 && next < line.count && line[next] == UInt8(ascii: ":") {
                let key = Array(line[start ..< end])
                if !keys.insert(key).inserted { return "the key \"\(String(decoding: key, as: UTF8.self))\" is given twice" }
            }
        }
        return nil
    }
}
