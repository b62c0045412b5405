// The report as one HTML file: no network, no external file. The jobs travel as one JSON document in a
// `<script type="application/json">` element and the page shows them a hundred at a time, so ten thousand jobs
// (with their thumbnails) open as fast as the browser parses the file.
import Foundation

extension RunReport {
    /// Jobs per page.
    public static let pageSize = 100

    public func html(generatedAt: Date = Date()) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        struct Payload: Encodable {
            let totals: ReportTotals
            let jobs: [ReportJob]
        }
        // Encodable values of plain strings and numbers always encode.
        let json = Self.scriptSafe(String(decoding: try! encoder.encode(Payload(totals: totals, jobs: jobs)), as: UTF8.self))
        let states = totals.states.keys.sorted()
        let keptShare = totals.imageTokensTotal > 0 ? String(format: "%.1f%%", 100 * Double(totals.imageTokensKept) / Double(totals.imageTokensTotal)) : "-"
        let perMinute = totals.wallSeconds > 0 ? String(format: "%.1f", Double(totals.states["succeeded", default: 0]) * 60 / totals.wallSeconds) : "-"
        let tokensPerSecond = totals.wallSeconds > 0 ? String(format: "%.1f", Double(totals.tokens) / totals.wallSeconds) : "-"
        var rows = [
            ("jobs", "\(totals.jobs)"),
        ] + states.map { ($0, "\(totals.states[$0]!)") }
        rows += [
            ("tokens generated", "\(totals.tokens)"),
            ("image tokens kept", "\(totals.imageTokensKept) of \(totals.imageTokensTotal) (\(keptShare))"),
            ("wall time", String(format: "%.1f s", totals.wallSeconds)),
            ("succeeded per minute", perMinute),
            ("tokens per second", tokensPerSecond),
        ]
        let totalsTable = rows.map { "<tr><th>\(Self.escape($0.0))</th><td>\(Self.escape($0.1))</td></tr>" }.joined()
        return """
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>\(Self.escape(title))</title>
        <style>\(Self.style)</style>
        </head><body>
        <header><h1>\(Self.escape(title))</h1><p class="generated">dllava report, \(Self.escape(ISO8601DateFormatter().string(from: generatedAt)))</p></header>
        <section class="summary">
        <table class="totals">\(totalsTable)</table>
        <figure class="throughput"><figcaption>Jobs finished over time</figcaption>\(throughputPlot())</figure>
        </section>
        <nav class="controls">
        <label>State <select id="state"><option value="all">all</option>\(states.map { "<option>\(Self.escape($0))</option>" }.joined())</select></label>
        <label>Search <input id="search" type="search" placeholder="custom id, caption or error"></label>
        <button id="previous">&#8592; previous</button> <span id="page"></span> <button id="next">next &#8594;</button>
        </nav>
        <main id="jobs"></main>
        <section class="failures"><h2>Failed jobs</h2><table id="failed"><thead><tr><th>job</th><th>custom id</th><th>image</th><th>error</th></tr></thead><tbody></tbody></table></section>
        <script type="application/json" id="report-data">\(json)</script>
        <script>\(Self.script)</script>
        </body></html>

        """
    }

    /// An SVG bar chart of jobs finished (succeeded or failed) per interval, at most 60 bars.
    func throughputPlot() -> String {
        let finished = jobs.filter { $0.state == "succeeded" || $0.state == "failed" }.compactMap(\.finishedAt)
        guard let first = finished.min(), let last = finished.max() else { return "<p class=\"empty\">no job has finished</p>" }
        let spanSeconds = max(1, Double(last - first) / 1000)
        let steps: [Double] = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400]
        let bucket = steps.first { spanSeconds / $0 <= 60 } ?? (spanSeconds / 60).rounded(.up)
        let count = Int(spanSeconds / bucket) + 1
        var bars = [Int](repeating: 0, count: count)
        for time in finished { bars[min(count - 1, Int(Double(time - first) / 1000 / bucket))] += 1 }
        let width = 600.0, height = 160.0, top = 10.0, bottom = 24.0, left = 36.0
        let most = max(1, bars.max()!), barWidth = (width - left) / Double(count)
        var svg = "<svg viewBox=\"0 0 \(Int(width)) \(Int(height))\" role=\"img\" aria-label=\"jobs finished per \(Self.describe(seconds: bucket))\">"
        for (i, value) in bars.enumerated() where value > 0 {
            let h = (height - top - bottom) * Double(value) / Double(most)
            svg += String(format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\"><title>%d</title></rect>",
                          left + Double(i) * barWidth + 0.5, height - bottom - h, max(1, barWidth - 1), h, value)
        }
        svg += String(format: "<text x=\"%.0f\" y=\"%.0f\" class=\"axis\">%d</text>", left - 4, top + 8, most)
        svg += String(format: "<text x=\"%.0f\" y=\"%.0f\" class=\"axis\">0</text>", left - 4, height - bottom)
        svg += "<text x=\"\(Int(left))\" y=\"\(Int(height - 6))\" class=\"axis start\">0</text>"
        svg += "<text x=\"\(Int(width))\" y=\"\(Int(height - 6))\" class=\"axis end\">\(Self.describe(seconds: spanSeconds)) from the first to the last; one bar per \(Self.describe(seconds: bucket))</text>"
        return svg + "</svg>"
    }

    static func describe(seconds: Double) -> String {
        if seconds < 120 { return String(format: "%.0f s", seconds) }
        if seconds < 7200 { return String(format: "%.0f min", seconds / 60) }
        return String(format: "%.1f h", seconds / 3600)
    }

    /// JSON that can sit inside a `<script>` element whatever its strings hold: `<`, `>`, `&`, U+2028 and U+2029 become
    /// `\u003c`-style escapes, so no `</script>`, `<!--` or `<script` can end the element or switch the HTML
    /// parser's script-data state, and the text is also valid JavaScript. These characters occur only inside JSON
    /// strings, where the escape means the same character.
    static func scriptSafe(_ json: String) -> String {
        var escaped: [UInt8] = []
        escaped.reserveCapacity(json.utf8.count)
        let bytes = Array(json.utf8)
        var index = 0
        func append(_ escape: String) { escaped.append(contentsOf: escape.utf8) }
        while index < bytes.count {
            let byte = bytes[index]
            switch byte {
            case UInt8(ascii: "<"): append("\\u003c")
            case UInt8(ascii: ">"): append("\\u003e")
            case UInt8(ascii: "&"): append("\\u0026")
            // U+2028 and U+2029 in UTF-8: E2 80 A8 and E2 80 A9.
            case 0xE2 where index + 2 < bytes.count && bytes[index + 1] == 0x80 && (bytes[index + 2] == 0xA8 || bytes[index + 2] == 0xA9):
                append(bytes[index + 2] == 0xA8 ? "\\u2028" : "\\u2029")
                index += 2
            default: escaped.append(byte)
            }
            index += 1
        }
        return String(decoding: escaped, as: UTF8.self)
    }

    static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static let style = """
    body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#1d1d1f;background:#fafafa}
    h1{font-size:22px;margin:18px 0 2px}.generated{color:#666;margin:0 0 12px}
    .summary{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
    .totals th{text-align:left;font-weight:500;color:#555;padding:2px 16px 2px 0}.totals td{font-variant-numeric:tabular-nums}
    .throughput{margin:0;flex:1;min-width:320px;max-width:640px}.throughput figcaption{color:#555}
    .throughput svg{width:100%;height:auto}.throughput rect{fill:#3b73b9}.axis{font-size:10px;fill:#666;text-anchor:end}
    .axis.start{text-anchor:start}
    .controls{margin:16px 0;display:flex;gap:16px;align-items:center;flex-wrap:wrap}
    #jobs{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
    .job{display:flex;gap:12px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
    .job.state-failed{border-color:#d33}.thumb{width:128px;height:128px;flex:none;border-radius:3px;background:#eee}
    .thumb.missing{display:flex;align-items:center;justify-content:center;font-size:11px;color:#777;text-align:center;padding:4px;box-sizing:border-box;overflow:hidden;word-break:break-all}
    .body{min-width:0;overflow-wrap:anywhere}
    .job h3{font-size:13px;margin:0 0 4px;color:#444}.caption{margin:0 0 6px}.error{margin:0 0 6px;color:#b00}
    .meta{font-size:12px;color:#666;margin:0;display:flex;flex-wrap:wrap;column-gap:10px}.meta span{white-space:nowrap}
    .failures table{border-collapse:collapse;font-size:12px}.failures td,.failures th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
    """

    static let script = """
    const data = JSON.parse(document.getElementById('report-data').textContent);
    const pageSize = \(pageSize);
    let page = 0;
    const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };
    const ms = v => v === undefined || v === null ? '-' : (v >= 1000 ? (v / 1000).toFixed(1) + ' s' : v.toFixed(0) + ' ms');
    function selected() {
      const state = document.getElementById('state').value, query = document.getElementById('search').value.toLowerCase();
      return data.jobs.filter(j => (state === 'all' || j.state === state) &&
        (!query || [j.custom_id, j.text, j.error, j.image].some(s => s && s.toLowerCase().includes(query))));
    }
    function card(j) {
      const article = el('article', 'job state-' + j.state);
      article.dataset.jobId = j.id;
      if (j.thumbnail) {
        const img = el('img', 'thumb' + (j.patches_drawn ? ' kept-patches' : ''));
        img.loading = 'lazy'; img.src = j.thumbnail; img.alt = j.image;
        img.title = j.image + (j.patches_drawn ? ' (dropped image patches darkened, kept ones outlined)' : '');
        article.append(img);
      } else {
        article.append(el('div', 'thumb missing', j.thumbnail_note || 'no image'));
      }
      const body = el('div', 'body');
      body.append(el('h3', '', '#' + j.id + (j.custom_id ? ' ' + j.custom_id : '')));
      if (j.text !== undefined) body.append(el('p', 'caption', j.text));
      if (j.error) body.append(el('p', 'error', j.error));
      const meta = el('p', 'meta');
      const parts = [j.state, 'attempts ' + j.attempts];
      if (j.tokens !== undefined) parts.push(j.tokens + ' tokens' + (j.finish_reason ? ' (' + j.finish_reason + ')' : ''));
      if (j.image_tokens_total) parts.push('image tokens ' + j.image_tokens_kept + '/' + j.image_tokens_total);
      if (j.prefill_ms !== undefined) parts.push('prefill ' + ms(j.prefill_ms));
      if (j.decode_ms !== undefined) parts.push('decode ' + ms(j.decode_ms));
      for (const p of parts) meta.append(el('span', '', p));
      body.append(meta);
      article.append(body);
      return article;
    }
    function render() {
      const jobs = selected(), pages = Math.max(1, Math.ceil(jobs.length / pageSize));
      page = Math.min(page, pages - 1);
      const main = document.getElementById('jobs');
      main.replaceChildren(...jobs.slice(page * pageSize, (page + 1) * pageSize).map(card));
      document.getElementById('page').textContent = 'page ' + (page + 1) + ' of ' + pages + ' (' + jobs.length + ' jobs)';
      document.getElementById('previous').disabled = page === 0;
      document.getElementById('next').disabled = page >= pages - 1;
    }
    document.getElementById('state').onchange = () => { page = 0; render(); };
    document.getElementById('search').oninput = () => { page = 0; render(); };
    document.getElementById('previous').onclick = () => { page--; render(); };
    document.getElementById('next').onclick = () => { page++; render(); };
    const failed = document.querySelector('#failed tbody');
    for (const j of data.jobs.filter(j => j.state === 'failed')) {
      const row = el('tr');
      for (const text of ['#' + j.id, j.custom_id || '', j.image, j.error || '']) row.append(el('td', '', text));
      failed.append(row);
    }
    if (!failed.children.length) document.querySelector('.failures').hidden = true;
    render();
    """
}
