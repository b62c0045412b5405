import ArgumentParser
import Foundation
import JobQueue

struct EnqueueCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enqueue", abstract: "Add jobs from a folder of images, a JSONL manifest or a CSV manifest.",
        discussion: """
        A JSONL line is {"custom_id": ..., "image": PATH, "prompt": TEXT, ...} with optional max_tokens, temperature, \
        top_p, top_k, seed, stop (a string or a list), sparsity, vision_keep_rate and priority; a CSV file has a header \
        row with the same column names. Relative image paths resolve against the manifest's folder. Parameter options \
        given here fill in what a line leaves out. A job whose custom_id (or, without one, whose image bytes, prompt and \
        parameters) is already queued is skipped, so enqueueing a manifest twice is harmless. Bad lines are reported \
        with their line number on stderr and the exit status is 65; the good lines are still enqueued.
        """)

    @OptionGroup var database: DatabaseOptions

    @Option(help: "Enqueue every .jpg, .jpeg and .png image in this folder (sorted by name), with --prompt.")
    var folder: String?

    @Option(help: "The prompt for every image of --folder.")
    var prompt: String?

    @Flag(help: "With --folder, include subfolders.")
    var recursive = false

    @Option(help: "A JSONL manifest.")
    var jsonl: String?

    @Option(help: "A CSV manifest (header row required).")
    var csv: String?

    @Option(name: .customLong("max-tokens"), help: "Default most tokens to generate.")
    var maxTokens: Int?

    @Option(help: "Default sampling temperature (0 is greedy).")
    var temperature: Double?

    @Option(name: .customLong("top-p"), help: "Default nucleus sampling mass.")
    var topP: Double?

    @Option(name: .customLong("top-k"), help: "Default top-k (0 = off).")
    var topK: Int?

    @Option(help: "Default random seed.")
    var seed: UInt64?

    @Option(help: "Default stop string (repeatable).")
    var stop: [String] = []

    @Option(help: "Default sparsification: dynamic, full, fastv or random.")
    var sparsity: String?

    @Option(name: .customLong("vision-keep-rate"), help: "Default fraction of image tokens kept.")
    var visionKeepRate: Double?

    @Option(help: "Priority for lines without one; lower runs first.")
    var priority: Int = 0

    @Option(name: .customLong("max-attempts"), help: "Tries before a job that keeps failing is marked failed.")
    var maxAttempts: Int = 3

    @Flag(help: "Print the report as one JSON object.")
    var json = false

    func validate() throws {
        let sources = [folder, jsonl, csv].compactMap { $0 }
        guard sources.count == 1 else { throw ValidationError("give exactly one of --folder, --jsonl and --csv") }
        if folder != nil && prompt == nil { throw ValidationError("--folder needs --prompt") }
        if folder == nil && prompt != nil { throw ValidationError("--prompt goes with --folder (manifests carry their prompts)") }
        if folder == nil && recursive { throw ValidationError("--recursive goes with --folder") }
        if let sparsity, JobParameters.Sparsity(rawValue: sparsity) == nil {
            throw ValidationError("--sparsity must be one of dynamic, full, fastv, random")
        }
        if let problem = defaults.problem() { throw ValidationError(problem.replacingOccurrences(of: "_", with: "-")) }
        guard maxAttempts >= 1 else { throw ValidationError("--max-attempts must be at least 1") }
    }

    var defaults: JobParameters {
        JobParameters(maxTokens: maxTokens, temperature: temperature, topP: topP, topK: topK, seed: seed,
                      stop: stop.isEmpty ? nil : stop, sparsity: sparsity.flatMap(JobParameters.Sparsity.init(rawValue:)),
                      visionKeepRate: visionKeepRate)
    }

    struct Report: Encodable {
        let source: String
        let inserted: Int
        let already_present: Int
        let bad_lines: [String]
    }

    func run() throws {
        try runQueueCommand(self, database: database.path) {
            let queue = try database.open()
            let options = ManifestOptions(defaults: defaults, priority: priority, maxAttempts: maxAttempts)
            let report: ManifestReport
            let source: String
            let onProblem: (ManifestProblem) -> Void = { writeStandardError($0.description) }
            if let folder {
                source = folder
                report = try queue.enqueueFolder(URL(fileURLWithPath: folder), prompt: prompt ?? "", recursive: recursive,
                                                 options: options, onProblem: onProblem)
            } else if let jsonl {
                source = jsonl
                report = try queue.enqueueJSONL(URL(fileURLWithPath: jsonl), options: options, onProblem: onProblem)
            } else {
                source = csv ?? ""
                report = try queue.enqueueCSV(URL(fileURLWithPath: source), options: options, onProblem: onProblem)
            }
            if json {
                try printJSON(Report(source: source, inserted: report.inserted, already_present: report.alreadyPresent,
                                     bad_lines: report.problems.map(\.description)))
            } else {
                var line = "enqueued \(report.inserted) job\(report.inserted == 1 ? "" : "s") from \(source)"
                if report.alreadyPresent > 0 { line += " (\(report.alreadyPresent) already queued)" }
                print(line)
            }
            if !report.problems.isEmpty {
                let count = report.problems.count
                let noun = folder == nil ? (count == 1 ? "line" : "lines") : (count == 1 ? "entry" : "entries")
                throw CommandFailure(message: "\(source): \(count) bad \(noun) skipped (see above)", code: 65)
            }
        }
    }
}
