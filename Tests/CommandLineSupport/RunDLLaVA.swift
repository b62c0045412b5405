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

/// Runs `executable arguments` to completion (a helper the tests check dllava's output with, such as an HTML parser).
@discardableResult
public func runProgram(_ executable: URL, _ arguments: [String], in directory: URL? = nil, environment: [String: String]? = nil) throws -> ProcessResult {
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = directory }
    if let environment { process.environment = environment }
    let output = Pipe(), error = Pipe()
    process.standardOutput = output
    process.standardError = error
    try process.run()
    let outputData = output.fileHandleForReading.readDataToEndOfFile()
    let errorData = error.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return ProcessResult(status: process.terminationStatus, standardOutput: String(decoding: outputData, as: UTF8.self),
                         standardError: String(decoding: errorData, as: UTF8.self))
}
