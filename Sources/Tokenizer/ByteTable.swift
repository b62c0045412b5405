/// A hash map from byte strings to ids that can be probed with a slice of a buffer without
/// allocating. Keys are compared byte for byte: Swift `String` equality would treat canonically
/// equivalent pieces ("é" and "e\u{301}") as equal, and tokenizers must not.
struct ByteTable: Sendable {
    private var storage: [UInt8] = []
    private var starts: [Int] = []
    private var lengths: [Int] = []
    private var values: [Int32] = []
    private var slots: [Int32]
    private var mask: Int

    init(capacity: Int) {
        var size = 16
        while size < capacity * 2 { size <<= 1 }
        slots = Array(repeating: -1, count: size)
        mask = size - 1
    }

    var count: Int { values.count }

    private static func hash(_ key: UnsafeBufferPointer<UInt8>) -> Int {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in key {
            h = (h ^ UInt64(byte)) &* 0x0000_0100_0000_01b3
        }
        return Int(truncatingIfNeeded: h ^ (h >> 29))
    }

    private func matches(_ entry: Int, _ key: UnsafeBufferPointer<UInt8>) -> Bool {
        guard lengths[entry] == key.count else { return false }
        let start = starts[entry]
        for i in 0..<key.count where storage[start + i] != key[i] { return false }
        return true
    }

    func value(_ key: UnsafeBufferPointer<UInt8>) -> Int32? {
        var slot = Self.hash(key) & mask
        while true {
            let entry = slots[slot]
            if entry < 0 { return nil }
            if matches(Int(entry), key) { return values[Int(entry)] }
            slot = (slot + 1) & mask
        }
    }

    func value(_ key: [UInt8]) -> Int32? {
        key.withUnsafeBufferPointer { value($0) }
    }

    /// Sets the value for `key`; returns false (and keeps the old value) if `key` was present,
    /// unless `overwrite` is true.
    @discardableResult
    mutating func insert(_ key: [UInt8], _ value: Int32, overwrite: Bool = false) -> Bool {
        if values.count * 2 >= slots.count { grow() }
        return key.withUnsafeBufferPointer { key in
            var slot = Self.hash(key) & mask
            while true {
                let entry = slots[slot]
                if entry < 0 { break }
                if matches(Int(entry), key) {
                    if overwrite { values[Int(entry)] = value }
                    return false
                }
                slot = (slot + 1) & mask
            }
            slots[slot] = Int32(values.count)
            starts.append(storage.count)
            lengths.append(key.count)
            storage.append(contentsOf: key)
            values.append(value)
            return true
        }
    }

    private mutating func grow() {
        let size = slots.count * 2
        slots = Array(repeating: -1, count: size)
        mask = size - 1
        storage.withUnsafeBufferPointer { all in
            for entry in 0..<values.count {
                let key = UnsafeBufferPointer(rebasing: all[starts[entry]..<(starts[entry] + lengths[entry])])
                var slot = Self.hash(key) & mask
                while slots[slot] >= 0 { slot = (slot + 1) & mask }
                slots[slot] = Int32(entry)
            }
        }
    }
}

/// A binary max-heap: `pop` returns the greatest element by `<`.
struct Heap<Element: Comparable> {
    private var items: [Element] = []

    init(reserving capacity: Int) {
        items.reserveCapacity(capacity)
    }

    mutating func push(_ element: Element) {
        items.append(element)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[parent] < element else { break }
            items[child] = items[parent]
            child = parent
        }
        items[child] = element
    }

    mutating func pop() -> Element? {
        guard let top = items.first else { return nil }
        let last = items.removeLast()
        if items.isEmpty { return top }
        var parent = 0
        let count = items.count
        while true {
            let left = 2 * parent + 1
            if left >= count { break }
            var larger = left
            if left + 1 < count, items[left] < items[left + 1] { larger = left + 1 }
            guard last < items[larger] else { break }
            items[parent] = items[larger]
            parent = larger
        }
        items[parent] = last
        return top
    }
}

/// UTF-8 helpers shared by both tokenizer formats.
enum UTF8Bytes {
    static let metaspace: [UInt8] = [0xE2, 0x96, 0x81]  // U+2581 "▁"
    static let replacementCharacter: [UInt8] = [0xEF, 0xBF, 0xBD]  // U+FFFD

    /// Length of the UTF-8 sequence that starts with `lead`, for valid UTF-8 input.
    @inline(__always)
    static func sequenceLength(_ lead: UInt8) -> Int {
        if lead < 0x80 { return 1 }
        if lead < 0xE0 { return 2 }
        if lead < 0xF0 { return 3 }
        return 4
    }

    /// Length of one well-formed character at `offset`, or nil if the bytes there are not
    /// well-formed UTF-8 (surrogates, overlong forms and values above U+10FFFF are rejected).
    static func validCharacterLength(_ bytes: [UInt8], at offset: Int) -> Int? {
        let lead = bytes[offset]
        let remaining = bytes.count - offset
        func trail(_ i: Int) -> UInt32? {
            let b = bytes[offset + i]
            return b & 0xC0 == 0x80 ? UInt32(b & 0x3F) : nil
        }
        if lead < 0x80 { return 1 }
        if lead & 0xE0 == 0xC0, remaining >= 2, let t1 = trail(1) {
            let cp = UInt32(lead & 0x1F) << 6 | t1
            return cp >= 0x80 ? 2 : nil
        }
        if lead & 0xF0 == 0xE0, remaining >= 3, let t1 = trail(1), let t2 = trail(2) {
            let cp = UInt32(lead & 0x0F) << 12 | t1 << 6 | t2
            return cp >= 0x800 && !(0xD800...0xDFFF).contains(cp) ? 3 : nil
        }
        if lead & 0xF8 == 0xF0, remaining >= 4, let t1 = trail(1), let t2 = trail(2), let t3 = trail(3) {
            let cp = UInt32(lead & 0x07) << 18 | t1 << 12 | t2 << 6 | t3
            return cp >= 0x10000 && cp <= 0x10FFFF ? 4 : nil
        }
        return nil
    }

    static func isValid(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            guard let length = validCharacterLength(bytes, at: offset) else { return false }
            offset += length
        }
        return true
    }

    static func hasPrefix(_ bytes: [UInt8], _ prefix: [UInt8], at offset: Int = 0) -> Bool {
        guard bytes.count - offset >= prefix.count else { return false }
        for i in 0..<prefix.count where bytes[offset + i] != prefix[i] { return false }
        return true
    }

    /// `bytes` with every non-overlapping occurrence of `pattern` (scanning left to right) replaced.
    static func replacing(_ pattern: [UInt8], with replacement: [UInt8], in bytes: [UInt8]) -> [UInt8] {
        guard !pattern.isEmpty, bytes.count >= pattern.count else { return bytes }
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count + bytes.count / 2)
        var i = 0
        while i < bytes.count {
            if bytes[i] == pattern[0], hasPrefix(bytes, pattern, at: i) {
                out.append(contentsOf: replacement)
                i += pattern.count
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return out
    }

    /// The byte of a byte-fallback piece `<0xNN>`, as sentencepiece spells them.
    static func byteFallbackValue(_ piece: [UInt8]) -> UInt8? {
        guard piece.count == 6, piece[0] == UInt8(ascii: "<"), piece[1] == UInt8(ascii: "0"),
              piece[2] == UInt8(ascii: "x"), piece[5] == UInt8(ascii: ">"),
              let high = hexDigit(piece[3]), let low = hexDigit(piece[4]) else { return nil }
        return high << 4 | low
    }

    static func hexDigit(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    static func byteFallbackPiece(_ byte: UInt8) -> [UInt8] {
        let digits = Array("0123456789ABCDEF".utf8)
        return Array("<0x".utf8) + [digits[Int(byte >> 4)], digits[Int(byte & 15)], UInt8(ascii: ">")]
    }
}
