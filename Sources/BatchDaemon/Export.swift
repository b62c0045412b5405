// `export`'s join of job rows and the results the daemon stored for them (files, or the queue's database), as a library
// function: the CLI only chooses the format and where the lines go. It lives here because
// BatchDaemon is the target that knows both the queue and the files.
import Artifacts
import Foundation
import JobQueue

/// One job as `dllava export` writes it: its row, and for a succeeded job the text and finish reason of its result
/// (checked against the recorded sha256; from the queue's database when it stores results, else from the recorded
/// file), or the error that kept the result from being read.
public struct ExportRecord: Encodable, Sendable, Equatable {
    public var jobID: Int64
    public var customID: String?
    public var image: String
    public var state: JobState
    public var attempts: Int
    public var finishReason: String?
    public var text: String?
    public var error: String?
    /// The job succeeded but its result file could not be read; `error` says why.
    public var resultUnreadable = false

    enum CodingKeys: String, CodingKey {
        case jobID = "job_id", customID = "custom_id", image, state, attempts, finishReason = "finish_reason", text, error
    }

    /// Column names of the CSV form, in order.
    public static let csvHeader = "custom_id,job_id,state,attempts,image,finish_reason,text,error\r\n"

    /// One JSON object and a newline; absent fields are left out.
    public func jsonLine() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Strings and integers always encode.
        return String(decoding: try! encoder.encode(self), as: UTF8.self) + "\n"
    }

    /// One RFC 4180 row (CRLF); absent fields are empty cells.
    public func csvRow() -> String {
        [customID, "\(jobID)", state.rawValue, "\(attempts)", image, finishReason, text, error]
            .map { Self.csvField($0 ?? "") }.joined(separator: ",") + "\r\n"
    }

    /// RFC 4180: quote a field holding a comma, quote, CR or LF, doubling its quotes.
    static func csvField(_ text: String) -> String {
        guard text.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return text }
        return "\"" + text.replacingOccurrences(of: "\"", with: "\"\"") + "\""
    }

    /// Calls `body` with the record of every job `filter` selects, by id, from one consistent snapshot of the queue.
    public static func forEach(in queue: JobQueue, _ filter: JobFilter, _ body: (ExportRecord) throws -> Void) throws {
        try queue.forEach(filter) { job in
            var record = ExportRecord(jobID: job.id, customID: job.customID, image: job.imagePath, state: job.state, attempts: job.attempt,
                                      error: job.state == .succeeded ? nil : job.error)
            if job.state == .succeeded {
                do {
                    let summary = try RecordedResult.read(ResultSummary.self, of: job, in: queue)
                    record.text = summary.text
                    record.finishReason = summary.finishReason
                } catch let error as ArtifactError {
                    record.error = "job \(job.id): \(error)"
                    record.resultUnreadable = true
                } catch let error as JobQueueError {
                    record.error = "job \(job.id): \(error)"
                    record.resultUnreadable = true
                }
            }
            try body(record)
        }
    }
}
