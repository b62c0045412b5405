// Faults of the storage under the queue and its outputs: a full
// `--out`, a full database disk, leftovers of failed completions and killed writers, a read-only
// database. The full and read-only disks are small tmpfs mounts, so these tests run only where the
// test process may mount (root in a container or VM); elsewhere they are skipped.
import CommandLineSupport
import Foundation
import GRDB
import Testing

/// Runs a system command (mount, umount) and says whether it succeeded.
@discardableResult
func system(_ arguments: [String]) -> Bool {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return false }
    process.waitUntilExit()
    return process.terminationStatus == 0
}

/// A tmpfs of `size` (mount's spelling, e.g. 64k) at a fresh folder, unmounted by `unmount()`.
struct SmallDisk {
    let mountPoint: URL

    init?(size: String) {
        mountPoint = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-disk-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: mountPoint, withIntermediateDirectories: true)
        guard system(["mount", "-t", "tmpfs", "-o", "size=\(size)", "tmpfs", mountPoint.path]) else {
            try? FileManager.default.removeItem(at: mountPoint)
            return nil
        }
    }

    /// Fills the disk: a file of zeros written until the disk refuses more.
    func fill() {
        let descriptor = open(mountPoint.appendingPathComponent("filler").path, O_WRONLY | O_CREAT, 0o644)
        defer { close(descriptor) }
        let block = [UInt8](repeating: 0, count: 4096)
        while block.withUnsafeBytes({ write(descriptor, $0.baseAddress, $0.count) }) > 0 {}
    }

    func resize(_ size: String) -> Bool { system(["mount", "-o", "remount,size=\(size)", mountPoint.path]) }
    func readOnly() -> Bool { system(["mount", "-o", "remount,ro", mountPoint.path]) }

    func unmount() {
        system(["umount", mountPoint.path])
        try? FileManager.default.removeItem(at: mountPoint)
    }
}

let canMountSmallDisks: Bool = {
    guard let disk = SmallDisk(size: "64k") else { return false }
    disk.unmount()
    return true
}()

@Suite("dllava run and the queue on failing storage", .serialized)
struct StorageFaultTests {
    let lines: [[String: Any]] = (0..<3).map { ["custom_id": "job\($0)", "image": sample("test_00000\($0).png"), "prompt": "Describe.", "max_tokens": 6] }

    @Test("--out on a full disk: exit 74 with the summary line, the batch released without counting the attempt, no temporary files; after freeing space the run completes",
          .enabled(if: canMountSmallDisks))
    func aFullOutputDiskReleasesTheBatch() throws {
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let disk = try #require(SmallDisk(size: "256k"))
        defer { disk.unmount() }
        let out = disk.mountPoint.appendingPathComponent("out")
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        disk.fill()

        let full = try run(["run", "--db", "q.sqlite", "--model", tinyModel, "--out", out.path, "--until-empty", "--batch-size", "3"], in: directory)
        #expect(full.status == 74, "\(full.standardError)")
        #expect(full.standardOutput == "claimed 3, succeeded 0, failed 0, retrying 0, cancelled 0, released 3, discarded 0\n")
        let queueFolder = out.appendingPathComponent(try queueID(directory))
        #expect(full.errorLines.last?.hasPrefix("dllava: cannot write the result of job 1 to \(queueFolder.path)/1-1.json.zst: ") == true, "\(full.standardError)")
        #expect(full.errorLines.last?.contains("No space left on device") == true, "\(full.standardError)")
        #expect(full.errorLines.last?.hasSuffix("; stopped, and released 3 jobs of the batch to the queue without counting the attempt") == true,
                "\(full.standardError)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: queueFolder.path) == ["snapshots"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: queueFolder.appendingPathComponent("snapshots").path).isEmpty)
        let show = try run(["show", "--db", "q.sqlite", "1", "--json"], in: directory)
        let row = try JSONSerialization.jsonObject(with: Data(show.standardOutput.utf8)) as! [String: Any]
        #expect(row["state"] as? String == "available" && row["attempt"] as? Int == 1 && row["max_attempts"] as? Int == 4)

        try FileManager.default.removeItem(at: disk.mountPoint.appendingPathComponent("filler"))
        let again = try run(["run", "--db", "q.sqlite", "--model", tinyModel, "--out", out.path, "--until-empty"], in: directory)
        #expect(again.status == 0, "\(again.standardError)")
        #expect(try export(directory).values.allSatisfy { $0["state"] as? String == "succeeded" })
    }

    @Test("enqueue on a full database disk: exit 74 naming the database, the count committed and how to go on; running it again enqueues the rest",
          .enabled(if: canMountSmallDisks))
    func aFullDatabaseDiskStopsEnqueueWithTheCountCommitted() throws {
        let disk = try #require(SmallDisk(size: "1m"))
        defer { disk.unmount() }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("dllava-fulldb-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = disk.mountPoint.appendingPathComponent("q.sqlite").path
        let manifest = directory.appendingPathComponent("many.jsonl")
        let image = sample("test_000000.png")
        let text = (0..<20_000).map { #"{"custom_id": "line-\#($0)", "image": "\#(image)", "prompt": "Describe picture \#($0) in detail, please."}"# }
        try Data((text.joined(separator: "\n") + "\n").utf8).write(to: manifest)
        #expect(try run(["init", "--db", database], in: directory).status == 0)

        let full = try run(["enqueue", "--db", database, "--jsonl", manifest.path], in: directory)
        #expect(full.status == 74, "\(full.standardError)")
        let message = full.errorLines.last ?? ""
        #expect(message.hasPrefix("dllava: the disk holding the queue database \(database) is full; free space and try again; \(manifest.path): "), "\(message)")
        #expect(message.hasSuffix("enqueued (committed) before the failure; run the same command again to enqueue the rest (jobs already queued are skipped)"))
        let committed = Int(message.components(separatedBy: "\(manifest.path): ").last?.split(separator: " ").first ?? "") ?? -1

        #expect(disk.resize("64m"))
        let counted = try DatabaseQueue(path: database).read { try Int.fetchOne($0, sql: "SELECT COUNT(*) FROM job") }
        #expect(counted == committed && committed > 0 && committed < 20_000, "\(message)")
        let rest = try run(["enqueue", "--db", database, "--jsonl", manifest.path], in: directory)
        #expect(rest.status == 0 && rest.standardOutput == "enqueued \(20_000 - committed) jobs from \(manifest.path) (\(committed) already queued)\n",
                "\(rest.standardOutput) \(rest.standardError)")
    }

    @Test("the database disk fills up while a job runs: exit 74 with the summary line, no result file that no row records; after freeing space the job is reclaimed and finishes",
          .enabled(if: canMountSmallDisks))
    func aFullDatabaseDiskDuringARunLeavesNoOrphanResult() throws {
        let disk = try #require(SmallDisk(size: "4m"))
        defer { disk.unmount() }
        let directory = try workspace(manifest: [["custom_id": "long", "image": sample("test_000001.png"), "prompt": "Describe.", "max_tokens": 1500]])
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = disk.mountPoint.appendingPathComponent("q.sqlite").path
        try FileManager.default.moveItem(atPath: directory.appendingPathComponent("q.sqlite").path, toPath: database)
        let queue = try JSONSerialization.jsonObject(with: Data(try run(["status", "--db", database, "--json"], in: directory).standardOutput.utf8))
        let folder = directory.appendingPathComponent("out").appendingPathComponent((queue as! [String: Any])["queue_id"] as! String)

        let process = Process(), output = Pipe(), errors = Pipe()
        process.executableURL = dllavaExecutable
        process.arguments = ["run", "--db", database, "--model", tinyModel, "--out", "out", "--until-empty", "--lease", "5m", "--snapshot-every", "0"]
        process.currentDirectoryURL = directory
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        // Once the job is claimed, the disk fills: the completion is the next write that needs room.
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            let status = try run(["status", "--db", database, "--json"], in: directory).standardOutput
            if let object = try? JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any],
               (object["counts"] as? [String: Int])?["running"] == 1 { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        disk.fill()
        let summary = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let log = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 74, "\(log)")
        #expect(summary == "claimed 1, succeeded 0, failed 0, retrying 0, cancelled 0, released 0, discarded 0\n", "\(summary)")
        #expect(log.contains("dllava: the disk holding the queue database \(database) is full; free space and try again; stopped, and released 0 jobs "
                             + "of the batch to the queue without counting the attempt; 1 stay running until their lease expires"), "\(log)")
        let left = (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? []
        #expect(left.allSatisfy { !$0.hasSuffix(".json.zst") && !$0.contains(".tmp-") }, "\(left)")

        #expect(disk.resize("64m"))
        try FileManager.default.removeItem(at: disk.mountPoint.appendingPathComponent("filler"))
        let again = try run(["run", "--db", database, "--model", tinyModel, "--out", "out", "--until-empty", "--lease", "5m"], in: directory)
        #expect(again.status == 0, "\(again.standardError)")
        #expect(again.standardError.contains("reclaimed 1 job of dead workers on this host"), "\(again.standardError)")
        let records = try run(["export", "--db", database, "--output", "-"], in: directory)
        #expect(records.standardOutput.contains(#""state":"succeeded""#), "\(records.standardOutput)")
    }

    @Test("status, list, show and export work on a queue on a read-only disk", .enabled(if: canMountSmallDisks))
    func readCommandsWorkOnAReadOnlyDatabase() throws {
        let disk = try #require(SmallDisk(size: "4m"))
        defer { disk.unmount() }
        let directory = try workspace(manifest: lines)
        defer { try? FileManager.default.removeItem(at: directory) }
        let database = disk.mountPoint.appendingPathComponent("q.sqlite").path
        try FileManager.default.copyItem(atPath: directory.appendingPathComponent("q.sqlite").path, toPath: database)
        #expect(disk.readOnly())
        for arguments in [["status"], ["list"], ["show", "1"], ["export", "--output", "-"]] {
            let result = try run([arguments[0], "--db", database] + arguments.dropFirst(), in: directory)
            #expect(result.status == 0, "\(arguments): \(result.standardError)")
        }
        // A command that changes jobs says it cannot write.
        let cancel = try run(["cancel", "--db", database, "--all"], in: directory)
        #expect(cancel.status == 78 && cancel.errorLines.first?.hasPrefix("dllava: cannot open the queue database \(database) for writing") == true,
                "\(cancel.standardError)")
    }

    @Test("a run sweeps what earlier runs left: a result file no row will record and stale temporary files; a pruned job's result stays")
    func leftoversAreSweptAtStart() throws {
        let directory = try workspace(manifest: Array(lines.prefix(2)))
        defer { try? FileManager.default.removeItem(at: directory) }
        let folder = try queueOutput(directory)
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("snapshots"), withIntermediateDirectories: true)
        // Job 1's first attempt wrote its result but the completion never reached the database; the lease then expired.
        let database = try DatabaseQueue(path: directory.appendingPathComponent("q.sqlite").path)
        try database.write { try $0.execute(sql: "UPDATE job SET attempt = 1, state = 'retryable' WHERE id = 1") }
        let orphan = folder.appendingPathComponent("1-1.json.zst"), pruned = folder.appendingPathComponent("99-1.json.zst")
        let staleResult = folder.appendingPathComponent(".2-1.json.zst.tmp-4000000-7")
        let staleSnapshot = folder.appendingPathComponent("snapshots/.job-2.kv.zst.tmp-4000000-8")
        let fresh = folder.appendingPathComponent(".2-9.json.zst.tmp-4000000-9")
        for file in [orphan, pruned, staleResult, staleSnapshot, fresh] { try Data("left".utf8).write(to: file) }
        let hourAgo = Date().addingTimeInterval(-3600)
        for file in [staleResult, staleSnapshot] { try FileManager.default.setAttributes([.modificationDate: hourAgo], ofItemAtPath: file.path) }

        let daemon = try startRun([], in: directory)
        daemon.waitUntilExit()
        #expect(daemon.terminationStatus == 0)
        let log = try String(contentsOf: directory.appendingPathComponent("run.log"), encoding: .utf8)
        #expect(log.contains("removed \(orphan.path): no job row records it (job 1 is retryable at attempt 1)"), "\(log)")
        for file in [orphan, staleResult, staleSnapshot] { #expect(!FileManager.default.fileExists(atPath: file.path), "\(file.path)") }
        for file in [pruned, fresh] { #expect(FileManager.default.fileExists(atPath: file.path), "\(file.path)") }
        let records = try export(directory)
        #expect(records["job0"]?["state"] as? String == "succeeded" && records["job0"]?["attempts"] as? Int == 2)
        #expect(records["job1"]?["state"] as? String == "succeeded")
    }
}
