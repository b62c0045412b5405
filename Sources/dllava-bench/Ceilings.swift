// The machine's own ceilings, measured in the same run as the products they judge: register-only
// loops of the products' instructions and a STREAM-like read of a buffer much larger than the
// last-level cache, each on `threads` threads at once.
import ArgumentParser
import CKernels
import Dispatch
import Foundation

struct Ceilings {
    /// AVX-512 f32 FMA, GFLOP/s (nil: no AVX-512 here).
    var fma: Double?
    /// AVX512-BF16 `vdpbf16ps`, GFLOP/s (nil: no AVX512-BF16 here).
    var bf16: Double?
    /// AVX512-VNNI `vpdpbusd`, giga integer operations per second (a multiply-add counts 2).
    var vnni: Double?
    /// Read bandwidth from memory, GB/s.
    var read: Double

    /// The best of `repeats` measurements of each ceiling on `threads` threads, reading `buffer`,
    /// timed by `clock`.
    static func measure(threads: Int, buffer: ReadBuffer, clock: BenchmarkClock, repeats: Int = 3) -> Ceilings {
        func loopRate(_ instruction: Int32) -> Double? {
            var best = 0.0
            for _ in 0..<repeats {
                let start = clock.now()
                let operations = concurrent(threads) { _ in dl_ceiling_loop(instruction, 2_000_000) }
                guard operations > 0 else { return nil }
                best = max(best, operations / clock.seconds(since: start, threads: threads) / 1e9)
            }
            return best
        }
        var read = 0.0
        for _ in 0..<repeats {
            let share = buffer.byteCount / threads / 256 * 256
            let start = clock.now()
            _ = concurrent(threads) { thread in Double(dl_ceiling_read(buffer.pointer + thread * share, share) & 1) }
            read = max(read, Double(share * threads) / clock.seconds(since: start, threads: threads) / 1e9)
        }
        return Ceilings(fma: loopRate(Int32(DL_CEILING_FMA)), bf16: loopRate(Int32(DL_CEILING_BF16)),
                        vnni: loopRate(Int32(DL_CEILING_VNNI)), read: read)
    }

    /// The larger of each ceiling (measured between the repeats of a table: the fractions are
    /// against the best the machine gave while the products ran).
    func merged(with other: Ceilings) -> Ceilings {
        func larger(_ a: Double?, _ b: Double?) -> Double? { a.flatMap { a in b.map { max(a, $0) } ?? a } ?? b }
        return Ceilings(fma: larger(fma, other.fma), bf16: larger(bf16, other.bf16), vnni: larger(vnni, other.vnni), read: max(read, other.read))
    }

    /// One line for the report.
    func line(threads: Int) -> String {
        func text(_ value: Double?, _ unit: String) -> String { value.map { String(format: "%.0f %@", $0, unit) } ?? "n/a" }
        return "ceilings, \(threads) thread\(threads == 1 ? "" : "s"): f32 FMA \(text(fma, "GFLOP/s")), vdpbf16ps \(text(bf16, "GFLOP/s")), "
            + "vpdpbusd \(text(vnni, "GOP/s")), read \(String(format: "%.1f", read)) GB/s"
    }
}

/// A buffer of `byteCount` bytes, written once so that its pages exist.
final class ReadBuffer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int

    init(byteCount: Int) {
        self.byteCount = byteCount
        pointer = UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 4096)
        memset(pointer, 1, byteCount)
    }

    deinit { pointer.deallocate() }
}

/// Runs `body(thread)` on `threads` threads at once; the sum of what they return.
private func concurrent(_ threads: Int, _ body: @Sendable (Int) -> Double) -> Double {
    let results = UnsafeMutableBufferPointer<Double>.allocate(capacity: threads)
    defer { results.deallocate() }
    let shared = UnsafeSendable(results)
    DispatchQueue.concurrentPerform(iterations: threads) { thread in shared.value[thread] = body(thread) }
    return results.reduce(0, +)
}

private struct UnsafeSendable<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}

/// How the weights benchmark times its products and ceilings.
enum BenchmarkClock: String, ExpressibleByArgument {
    /// Elapsed time: what a user waits for; on a machine shared with other work it counts the time
    /// the benchmark's threads were waiting for a CPU.
    case wall
    /// The process's CPU time divided by the thread count: the time the work would take with every
    /// thread on a CPU of its own; robust to time-slicing on a busy machine, blind to threads
    /// waiting for one another (cache and memory bandwidth shared with other work still count).
    case cpu

    /// Seconds on this clock.
    func now() -> Double {
        switch self {
        case .wall: return Double(DispatchTime.now().uptimeNanoseconds) / 1e9
        case .cpu:
            var time = timespec()
            clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &time)
            return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
        }
    }

    /// The seconds since `start` of work run on `threads` threads.
    func seconds(since start: Double, threads: Int) -> Double {
        self == .wall ? now() - start : (now() - start) / Double(max(1, threads))
    }
}
