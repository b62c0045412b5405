// Log lines (plain and JSON), the Prometheus textfile and the /metrics server, in process.
import BatchDaemon
import Foundation
import Logging
import Telemetry
import Testing
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

final class Lines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var all: [String] { lock.withLock { lines } }
}

@Suite("Logs and metrics for operators")
struct TelemetryTests {
    func logger(_ format: LogFormat, level: Logger.Level = .info, into lines: Lines) -> Logger {
        var logger = Logger(label: "test") { _ in RunLogHandler(format: format, level: level, write: { lines.append($0) }) }
        logger[metadataKey: "worker"] = "host-1-abc"
        return logger
    }

    @Test func jsonLinesCarryTimeLevelMessageAndTheJobsIdentity() throws {
        let lines = Lines()
        let log = logger(.json, into: lines)
        log.warning("job 7: the image \"a.jpg\"\nis broken", metadata: ["job_id": "7", "custom_id": "cat-1", "attempt": "2"])
        log.info("admitted 2 jobs")
        #expect(lines.all.count == 2)
        let first = try #require(JSONSerialization.jsonObject(with: Data(lines.all[0].utf8)) as? [String: Any])
        #expect(first["level"] as? String == "warning" && first["message"] as? String == "job 7: the image \"a.jpg\"\nis broken")
        #expect(first["job_id"] as? Int == 7 && first["custom_id"] as? String == "cat-1" && first["worker"] as? String == "host-1-abc")
        #expect(first["attempt"] as? String == "2")
        #expect((first["time"] as? String)?.wholeMatch(of: #/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/#) != nil, "\(first)")
        #expect(lines.all[0].hasPrefix("{\"time\":") && !lines.all[0].contains("\n"))
        let second = try #require(JSONSerialization.jsonObject(with: Data(lines.all[1].utf8)) as? [String: Any])
        #expect(second["job_id"] == nil && second["message"] as? String == "admitted 2 jobs")
    }

    @Test func plainLinesAreTheSentenceAloneAndLevelsBelowTheChosenOneAreDropped() {
        let lines = Lines()
        let log = logger(.plain, level: .notice, into: lines)
        log.info("admitted 1 job")
        log.notice("released jobs 1, 2 to the queue", metadata: ["job_id": "1"])
        log.error("cannot release jobs 3")
        #expect(lines.all == ["dllava: released jobs 1, 2 to the queue", "dllava: cannot release jobs 3"])
    }

    @Test func theTextfileIsWrittenAtomicallyInPrometheusFormat() throws {
        let registry = MetricsRegistry()
        let metrics = DaemonMetrics(factory: registry.factory)
        metrics.jobsClaimed.increment(by: 3)
        metrics.queueDepth.record(12)
        metrics.decodeStep.recordMilliseconds(7.0)
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-metrics-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("dllava.prom")
        try registry.writeTextFile(to: file)
        let text = try String(contentsOf: file, encoding: .utf8)
        #expect(text.contains("# TYPE dllava_jobs_claimed_total counter\ndllava_jobs_claimed_total 3\n"), "\(text)")
        #expect(text.contains("dllava_queue_depth 12"))
        #expect(text.contains("dllava_stage_duration_seconds_bucket{stage=\"decode_step\",le=\"0.005\"} 0\n"))
        #expect(text.contains("dllava_stage_duration_seconds_bucket{stage=\"decode_step\",le=\"0.01\"} 1\n"))
        #expect(text.contains("dllava_stage_duration_seconds_count{stage=\"decode_step\"} 1\n"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path) == ["dllava.prom"])

        // The writer rewrites when jobs finish, and reports (once) a file it cannot write without throwing.
        let failures = Lines()
        let writer = MetricsFileWriter(registry: registry, url: directory.appendingPathComponent("gone/dllava.prom"), failed: { failures.append($0) })
        writer.update(done: 1)
        writer.update(done: 2)
        writer.finish()
        #expect(failures.all.count == 1 && failures.all[0].contains("gone/dllava.prom"))
    }

    @Test func theServerAnswersGetMetricsOnLoopbackAnd404Elsewhere() async throws {
        let registry = MetricsRegistry()
        let metrics = DaemonMetrics(factory: registry.factory)
        metrics.jobsSucceeded.increment(by: 2)
        let server = try MetricsServer(registry: registry, port: 0)
        defer { server.close() }
        #expect(server.port > 0)
        let (data, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(server.port)/metrics")!)
        let http = try #require(response as? HTTPURLResponse)
        #expect(http.statusCode == 200 && http.value(forHTTPHeaderField: "Content-Type") == "text/plain; version=0.0.4; charset=utf-8")
        #expect(String(decoding: data, as: UTF8.self).contains("dllava_jobs_succeeded_total 2\n"))
        metrics.jobsSucceeded.increment()
        let (again, _) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(server.port)/metrics")!)
        #expect(String(decoding: again, as: UTF8.self).contains("dllava_jobs_succeeded_total 3\n"))
        let (_, missing) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(server.port)/")!)
        #expect((missing as? HTTPURLResponse)?.statusCode == 404)
        // A port in use is refused with a sentence naming it.
        #expect(throws: MetricsServerError.self) { try MetricsServer(registry: registry, port: server.port) }
    }
}
