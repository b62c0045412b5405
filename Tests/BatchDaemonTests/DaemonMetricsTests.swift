// The daemon's metrics with the fake engine: each count moves with the report, and every step and result write is
// timed.
import BatchDaemon
import Foundation
import JobQueue
import MetricsTestKit
import Testing

@Suite("The daemon's metrics with a fake engine")
struct DaemonMetricsTests {
    @Test("claims, outcomes, tokens, cancels, queue depth and stage timers are counted as the run goes")
    func countsFollowTheRun() throws {
        let workspace = try Workspace(prompts: ["tokens 3", "bad", "tokens 2", "tokens 5", "tokens 9"])
        defer { try? FileManager.default.removeItem(at: workspace.directory) }
        let world = FakeWorld(clock: workspace.clock)
        let queue = workspace.queue
        world.afterStep = { step in
            if step == 3 { _ = try! queue.cancel(ids: [5]) }
        }
        let metrics = TestMetrics()
        var options = DaemonOptions()
        options.batchSize = 2
        options.untilEmpty = true
        options.snapshotInterval = .never
        let daemon = try BatchDaemon(queue: queue, runner: FakeRunner(world: world), out: workspace.directory.appendingPathComponent("out"),
                                     options: options, metrics: DaemonMetrics(factory: metrics))
        let report = try daemon.run(stop: StopFlag(), log: { _ in })
        #expect(report.succeeded == 3 && report.failed == 1 && report.cancelled == 1)
        #expect(try metrics.expectCounter("dllava_jobs_claimed_total").totalValue == 5)
        #expect(try metrics.expectCounter("dllava_jobs_succeeded_total").totalValue == 3)
        #expect(try metrics.expectCounter("dllava_jobs_failed_total").totalValue == 1)
        #expect(try metrics.expectCounter("dllava_jobs_cancelled_total").totalValue == 1)
        #expect(try metrics.expectCounter("dllava_jobs_retried_total").totalValue == 0)
        #expect(try metrics.expectCounter("dllava_lease_losses_total").totalValue == 0)
        #expect(try metrics.expectCounter("dllava_tokens_generated_total").totalValue == Int64(report.generatedTokens))
        #expect(report.generatedTokens == 3 + 2 + 5)
        #expect(try metrics.expectGauge("dllava_queue_depth").lastValue == 0)
        #expect(try metrics.expectGauge("dllava_jobs_running").lastValue == 0)
        let steps = try metrics.expectTimer(DaemonMetrics.stageHistogram, [("stage", "decode_step")]).values.count
        #expect(steps == world.steps.count && steps > 0)
        #expect(try metrics.expectTimer(DaemonMetrics.stageHistogram, [("stage", "result_write")]).values.count == 3)
        // The fake engine measures neither admissions nor jobs: those stay unrecorded.
        #expect(try metrics.expectTimer(DaemonMetrics.stageHistogram, [("stage", "vision")]).values.isEmpty)
        #expect(try metrics.expectCounter("dllava_image_tokens_total").totalValue == 0)
    }
}
