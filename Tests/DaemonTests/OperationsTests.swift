// What `dllava run` tells operators: JSON log lines, a node_exporter textfile, and /metrics over HTTP, from real
// processes with the shipped model.
import CommandLineSupport
import Foundation
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `name{labels} value` lines of a Prometheus text exposition, by the text before the value.
func prometheusSamples(_ text: String) -> [String: Double] {
    var samples: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
        samples[String(line[..<space])] = value
    }
    return samples
}

/// A port nobody listens on now (bound to 0 and released), for a server the test starts next.
func freeLoopbackPort() throws -> Int {
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(descriptor) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    try withUnsafeMutablePointer(to: &address) { pointer in
        try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { socketAddress in
            guard bind(descriptor, socketAddress, length) == 0, getsockname(descriptor, socketAddress, &length) == 0 else {
                throw POSIXError(.EADDRINUSE)
            }
        }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

@Suite("dllava run: logs and metrics", .serialized)
struct OperationsTests {
    @Test("--log-format json writes one object per line with time, level, message, worker, and job_id and custom_id on a job's lines")
    func jsonLogs() throws {
        let directory = try workspace(jobs: [("a", sample("test_000000.png"), "Describe the image."),
                                             ("broken", badImage, "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty",
                              "--log-format", "json", "--log-level", "debug"], in: directory)
        #expect(daemon.status == 0, "\(daemon.standardError)")
        let lines = try daemon.errorLines.map { try #require(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any], "\($0)") }
        #expect(!lines.isEmpty)
        for line in lines {
            #expect((line["time"] as? String)?.wholeMatch(of: #/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/#) != nil, "\(line)")
            #expect(line["level"] is String && line["message"] is String && (line["worker"] as? String)?.isEmpty == false, "\(line)")
        }
        let broken = try #require(lines.first { $0["custom_id"] as? String == "broken" })
        #expect(broken["level"] as? String == "warning" && broken["job_id"] as? Int == 2)
        #expect((broken["message"] as? String)?.contains("bad_truncated.jpg") == true)
        let succeeded = try #require(lines.first { $0["custom_id"] as? String == "a" })
        #expect(succeeded["level"] as? String == "debug" && succeeded["job_id"] as? Int == 1)
        #expect((succeeded["message"] as? String)?.hasPrefix("job 1: succeeded") == true)
        #expect(lines.contains { ($0["message"] as? String)?.hasPrefix("admitted 1 job") == true && $0["level"] as? String == "info" })

        // --log-level warning keeps only the failure; the plain format is the sentence as before.
        let again = try workspace(jobs: [("a", sample("test_000000.png"), "Describe the image."), ("broken", badImage, "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: again) }
        let quiet = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--log-level", "warning"], in: again)
        #expect(quiet.status == 0)
        #expect(quiet.errorLines.count == 1 && quiet.errorLines[0].hasPrefix("dllava: job 2: "), "\(quiet.standardError)")
    }

    @Test("--metrics-file leaves a node_exporter textfile with the run's counters, image tokens and stage histograms")
    func metricsFile() throws {
        let directory = try workspace(jobs: [("a", sample("test_000000.png"), "Describe the image."),
                                             ("b", sample("test_000003.png"), "Describe the image."),
                                             ("broken", badImage, "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        try FileManager.default.createDirectory(at: directory.appendingPathComponent("metrics"), withIntermediateDirectories: true)
        let daemon = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty", "--batch-size", "2",
                              "--metrics-file", "metrics/dllava.prom"], in: directory)
        #expect(daemon.status == 0, "\(daemon.standardError)")
        let text = try String(contentsOf: directory.appendingPathComponent("metrics/dllava.prom"), encoding: .utf8)
        let samples = prometheusSamples(text)
        #expect(samples["dllava_jobs_claimed_total"] == 3, "\(text)")
        #expect(samples["dllava_jobs_succeeded_total"] == 2 && samples["dllava_jobs_failed_total"] == 1)
        #expect(samples["dllava_jobs_retried_total"] == 0 && samples["dllava_lease_losses_total"] == 0)
        #expect(samples["dllava_queue_depth"] == 0 && samples["dllava_jobs_running"] == 0)
        // The shipped model has 144 image tokens and keeps a part of them (Dynamic-LLaVA by default).
        #expect(samples["dllava_image_tokens_total"] == 288)
        let kept = try #require(samples["dllava_image_tokens_kept_total"])
        #expect(kept > 0 && kept < 288)
        #expect((samples["dllava_kv_cells_kept_total"] ?? 0) > 0)
        #expect((samples["dllava_tokens_generated_total"] ?? 0) >= 2)
        for stage in ["image_decode", "vision", "prefill", "decode_step", "result_write"] {
            #expect((samples["dllava_stage_duration_seconds_count{stage=\"\(stage)\"}"] ?? 0) >= 1, "\(stage)")
        }
        #expect(samples["dllava_stage_duration_seconds_count{stage=\"result_write\"}"] == 2)
        #expect(text.contains("# TYPE dllava_stage_duration_seconds histogram"))
        // Written atomically: nothing but the file in its folder.
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.appendingPathComponent("metrics").path) == ["dllava.prom"])

        // A metrics file that cannot be written is a configuration error before any job is claimed.
        let bad = try run(["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--until-empty",
                           "--metrics-file", "missing/folder/dllava.prom"], in: directory)
        #expect(bad.status == 78 && bad.standardError.contains("missing/folder/dllava.prom"), "\(bad.standardError)")
    }

    @Test("--metrics-port serves /metrics on loopback while the daemon runs, and SIGTERM stops it")
    func metricsPort() async throws {
        let directory = try workspace(jobs: [("a", sample("test_000001.png"), "Describe the image."),
                                             ("b", sample("test_000002.png"), "Describe the image.")])
        defer { try? FileManager.default.removeItem(at: directory) }
        let port = try freeLoopbackPort()
        let process = Process()
        process.executableURL = dllavaExecutable
        process.arguments = ["run", "--db", "q.sqlite", "--model", model, "--out", "out", "--metrics-port", "\(port)"]
        process.currentDirectoryURL = directory
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let url = URL(string: "http://127.0.0.1:\(port)/metrics")!
        var samples: [String: Double] = [:]
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline && samples["dllava_jobs_succeeded_total"] != 2 {
            try await Task.sleep(nanoseconds: 200_000_000)
            guard let (data, response) = try? await URLSession.shared.data(from: url) else { continue }
            #expect((response as? HTTPURLResponse)?.statusCode == 200)
            #expect((response as? HTTPURLResponse)?.value(forHTTPHeaderField: "Content-Type")?.hasPrefix("text/plain; version=0.0.4") == true)
            samples = prometheusSamples(String(decoding: data, as: UTF8.self))
        }
        #expect(samples["dllava_jobs_succeeded_total"] == 2 && samples["dllava_jobs_claimed_total"] == 2)
        let (_, missing) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)/other")!)
        #expect((missing as? HTTPURLResponse)?.statusCode == 404)
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
    }
}
