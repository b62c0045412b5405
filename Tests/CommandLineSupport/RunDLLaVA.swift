// Running the built `dllava` executable as a user or cron would, for the command-line tests.
import Foundation

/// The `dllava` executable built beside the test bundle.
public let dllavaExecutable = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("dllava")

public struct ProcessResult: Sendable {
    public let status: Int32
    public let standardOutput: String
    public let standardError: String
    public var errorLines: [String] { standardError.split(separator: "\n").map(String.init) }
}

/// Runs `dllava arguments` (or another built executable's: the library example) in `directory` when given, with
/// `environment` when given, to completion.
@discardableResult
public func runDLLaVA(_ arguments: [String], in directory: URL? = nil, environment: [String: String]? = nil,
                      executable: URL = dllavaExecutable) throws -> ProcessResult {
    try runProgram(executable, arguments, in: directory, environment: environment)
}

/// A program that was still running at its deadline, and was killed.
public struct ProcessDeadlineExpired: Error, CustomStringConvertible {
    public let command: String
    public let seconds: Int
    public var description: String { "\(command) was still running after \(seconds) s and was killed" }
}

/// Runs `executable arguments` to completion (a helper the tests check dllava's output with, such as an HTML parser).
/// stdout and stderr are read at the same time, so a child that fills one pipe while the other is being read cannot
/// hang the test; a child still running after `deadlineSeconds` is killed (SIGKILL) and `ProcessDeadlineExpired` is
/// thrown, so one hung child fails its test instead of hanging the suite.
@discardableResult
public func runProgram(_ executable: URL, _ arguments: [String], in directory: URL? = nil, environment: [String: String]? = nil,
                       deadlineSeconds: Int = 900) throws -> ProcessResult {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = directory }
    if let environment { process.environment = environment }
    let output = Pipe(), error = Pipe()
    process.standardOutput = output
    process.standardError = error
    try process.run()
    let errorData = ReadInBackground(error.fileHandleForReading)
    let killer = DispatchSource.makeTimerSource()
    let expired = ExpiryFlag()
    killer.schedule(deadline: .now() + .seconds(deadlineSeconds))
    killer.setEventHandler {
        guard process.isRunning else { return }
        expired.set()
        kill(process.processIdentifier, SIGKILL)
    }
    killer.resume()
    let outputData = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    killer.cancel()
    let standardError = errorData.wait()
    if expired.isSet {
        throw ProcessDeadlineExpired(command: ([executable.lastPathComponent] + arguments).joined(separator: " "), seconds: deadlineSeconds)
    }
    return ProcessResult(status: process.terminationStatus, standardOutput: String(decoding: outputData, as: UTF8.self),
                         standardError: String(decoding: standardError, as: UTF8.self))
}

/// Reads a file handle to its end on another thread.
private final class ReadInBackground: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchGroup()

    init(_ handle: FileHandle) {
        done.enter()
        DispatchQueue.global().async { [self] in
            data = handle.readDataToEndOfFile()
            done.leave()
        }
    }

    /// The bytes read, once the writer has closed its end.
    func wait() -> Data {
        done.wait()
        return data
    }
}

/// A flag set once, from the deadline's timer.
private final class ExpiryFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}
