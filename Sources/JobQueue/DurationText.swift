/// Durations as the CLI spells them: one or more `<integer><unit>` parts with units `d`, `h`, `m`, `s`, `ms`,
/// largest first, no spaces (`7d`, `12h`, `1h30m`, `250ms`).
public enum DurationText {
    public static func milliseconds(_ text: String) -> Int64? {
        let units: [(String, Int64)] = [("ms", 1), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)]
        var rest = Substring(text)
        var total: Int64 = 0
        var lastScale = Int64.max
        guard !rest.isEmpty else { return nil }
        while !rest.isEmpty {
            let digits = rest.prefix(while: \.isASCII).prefix(while: \.isNumber)
            guard !digits.isEmpty, let value = Int64(digits) else { return nil }
            rest = rest.dropFirst(digits.count)
            guard let (unit, scale) = units.first(where: { rest.hasPrefix($0.0) }), scale < lastScale else { return nil }
            rest = rest.dropFirst(unit.count)
            lastScale = scale
            let (product, overflow) = value.multipliedReportingOverflow(by: scale)
            guard !overflow else { return nil }
            let (sum, overflowSum) = total.addingReportingOverflow(product)
            guard !overflowSum else { return nil }
            total = sum
        }
        return total
    }

    /// `1h 2m 3s`-style text for reports (seconds precision; `0s` for zero).
    public static func describe(milliseconds: Int64) -> String {
        var seconds = max(milliseconds, 0) / 1_000
        var parts: [String] = []
        for (unit, size) in [("d", Int64(86_400)), ("h", 3_600), ("m", 60)] where seconds >= size {
            parts.append("\(seconds / size)\(unit)")
            seconds %= size
        }
        if seconds > 0 || parts.isEmpty { parts.append("\(seconds)s") }
        return parts.joined(separator: " ")
    }
}
