// `dllava report`: one self-contained HTML file that shows a queue's run: per job the image (a thumbnail embedded
// as a data URI, with the kept image patches of a Dynamic-LLaVA job drawn over it), the caption or the error, state,
// timings and tokens; the totals; jobs finished over time. It reads the queue and its stored results (files, or the
// database of a PostgreSQL queue, the way `export` does), never the model.
import Artifacts
import BatchDaemon
import Foundation
import Imaging
import JobQueue

/// The fields of a result file the report shows (any version: the stats fields are optional).
struct ReportResult: Decodable {
    struct Stats: Decodable {
        var imageTokensTotal: Int?
        var imageTokensKept: Int?
        var keptImageIndices: [Int]?
        var prefillMilliseconds: Double?
        var decodeMilliseconds: Double?

        enum CodingKeys: String, CodingKey {
            case imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept", keptImageIndices = "kept_image_indices"
            case prefillMilliseconds = "prefill_ms", decodeMilliseconds = "decode_ms"
        }
    }

    var text: String
    var tokenIDs: [Int32]
    var finishReason: String
    var stats: Stats?

    enum CodingKeys: String, CodingKey {
        case text, tokenIDs = "token_ids", finishReason = "finish_reason", stats
    }
}

/// One job as the report shows it.
public struct ReportJob: Encodable, Sendable, Equatable {
    public var id: Int64
    public var customID: String?
    public var image: String
    public var prompt: String
    public var state: String
    public var attempts: Int
    public var text: String?
    public var error: String?
    public var finishReason: String?
    public var tokens: Int?
    public var imageTokensTotal: Int?
    public var imageTokensKept: Int?
    /// The kept patches are drawn on the thumbnail.
    public var patchesDrawn = false
    /// The job succeeded but its result could not be read; `error` says why.
    public var resultUnreadable = false
    public var prefillMilliseconds: Double?
    public var decodeMilliseconds: Double?
    /// Unix milliseconds.
    public var startedAt: Int64?
    public var finishedAt: Int64?
    /// `data:image/jpeg;base64,...`, or nil with `thumbnailNote` saying why (the image is gone or unreadable, or it
    /// changed since the job ran: then neither it nor the kept patches are drawn).
    public var thumbnail: String?
    public var thumbnailNote: String?

    enum CodingKeys: String, CodingKey {
        case id, customID = "custom_id", image, prompt, state, attempts, text, error, finishReason = "finish_reason", tokens
        case imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept", patchesDrawn = "patches_drawn"
        case resultUnreadable = "result_unreadable"
        case prefillMilliseconds = "prefill_ms", decodeMilliseconds = "decode_ms", startedAt = "started_at", finishedAt = "finished_at"
        case thumbnail, thumbnailNote = "thumbnail_note"
    }
}

/// The run's figures, over every job of the queue.
public struct ReportTotals: Encodable, Sendable, Equatable {
    public var jobs = 0
    public var states: [String: Int] = [:]
    public var tokens = 0
    public var imageTokensTotal = 0
    public var imageTokensKept = 0
    /// From the first start to the last finish, seconds.
    public var wallSeconds = 0.0

    enum CodingKeys: String, CodingKey {
        case jobs, states, tokens, imageTokensTotal = "image_tokens_total", imageTokensKept = "image_tokens_kept", wallSeconds = "wall_seconds"
    }
}

public struct RunReport: Sendable {
    public var title: String
    public var jobs: [ReportJob] = []
    public var totals = ReportTotals()
    /// One sentence per succeeded job whose result could not be read ("job 3: ..."); the page shows each on its job.
    public var unreadableResults: [String] = []

    /// Thumbnails: the longer side in pixels, and the JPEG quality.
    public static let thumbnailSide = 128
    public static let thumbnailQuality = 72

    /// Reads every job of `queue` (by id) and the results of the succeeded ones (`RecordedResult`, from the files or
    /// the database that holds them). A result that cannot be read (also listed in `unreadableResults`), an image that
    /// is gone, or an image whose sha256 is no longer the one its job recorded is shown as such on its job.
    public static func build(from queue: JobQueue, title: String) throws -> RunReport {
        var report = RunReport(title: title)
        try queue.forEach(.all) { job in
            let entry = reportJob(job, in: queue)
            if entry.resultUnreadable, let error = entry.error { report.unreadableResults.append("job \(job.id): \(error)") }
            report.jobs.append(entry)
        }
        report.totals = totals(of: report.jobs)
        return report
    }

    static func reportJob(_ job: Job, in queue: JobQueue) -> ReportJob {
        var entry = ReportJob(id: job.id, customID: job.customID, image: job.imagePath, prompt: job.prompt, state: job.state.rawValue,
                              attempts: job.attempt, error: job.state == .succeeded ? nil : job.error,
                              prefillMilliseconds: job.timings?.prefillMs, decodeMilliseconds: job.timings?.decodeMs,
                              startedAt: job.startedAt, finishedAt: job.finalizedAt)
        var kept: [Int]?
        if job.state == .succeeded {
            do {
                let result = try RecordedResult.read(ReportResult.self, of: job, in: queue)
                entry.text = result.text
                entry.finishReason = result.finishReason
                entry.tokens = result.tokenIDs.count
                entry.imageTokensTotal = result.stats?.imageTokensTotal
                entry.imageTokensKept = result.stats?.imageTokensKept
                kept = result.stats?.keptImageIndices
                entry.prefillMilliseconds = result.stats?.prefillMilliseconds ?? entry.prefillMilliseconds
                entry.decodeMilliseconds = result.stats?.decodeMilliseconds ?? entry.decodeMilliseconds
            } catch {
                entry.error = "the result cannot be read: \(error)"
                entry.resultUnreadable = true
            }
        }
        do {
            let current = try Checksum.sha256Hex(fileAt: URL(fileURLWithPath: job.imagePath))
            guard current == job.imageSHA256 else {
                // The job's caption and kept patches describe the image it was given, not the one there now.
                entry.thumbnailNote = "image changed since the job ran: \(job.imagePath) has sha256 \(current), the job recorded \(job.imageSHA256)"
                return entry
            }
            let (thumbnail, drawn) = try thumbnail(of: job.imagePath, kept: kept, imageTokens: entry.imageTokensTotal)
            entry.thumbnail = "data:image/jpeg;base64," + thumbnail.base64EncodedString()
            entry.patchesDrawn = drawn
        } catch {
            entry.thumbnailNote = "\(error)"
        }
        return entry
    }

    /// The image as LLaVA-1.5's preprocessing squares it (padded to a square, centred), `thumbnailSide` pixels a side,
    /// with the kept patches drawn when `kept` is given and the image tokens form a square grid; JPEG bytes.
    static func thumbnail(of path: String, kept: [Int]?, imageTokens: Int?) throws -> (Data, drawn: Bool) {
        let decoder = ImageDecoder(options: ImageDecoder.Options(jpegMinimumLongSide: 2 * thumbnailSide))
        let image = try decoder.decode(contentsOf: URL(fileURLWithPath: path))
        var square = CLIPImagePreprocessor(resolution: thumbnailSide).croppedSquare(for: image)
        var drawn = false
        if let kept, let imageTokens, imageTokens > 0 {
            let grid = Int(Double(imageTokens).squareRoot().rounded())
            if grid * grid == imageTokens {
                square = KeptPatches.overlay(square, grid: grid, kept: kept)
                drawn = true
            }
        }
        return (try square.jpegData(quality: thumbnailQuality), drawn)
    }

    static func totals(of jobs: [ReportJob]) -> ReportTotals {
        var totals = ReportTotals()
        totals.jobs = jobs.count
        for job in jobs {
            totals.states[job.state, default: 0] += 1
            totals.tokens += job.tokens ?? 0
            totals.imageTokensTotal += job.imageTokensTotal ?? 0
            totals.imageTokensKept += job.imageTokensKept ?? 0
        }
        let starts = jobs.compactMap(\.startedAt), finishes = jobs.compactMap(\.finishedAt)
        if let first = starts.min(), let last = finishes.max(), last > first { totals.wallSeconds = Double(last - first) / 1000 }
        return totals
    }
}
