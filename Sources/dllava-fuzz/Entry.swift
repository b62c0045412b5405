import Foundation

// Built two ways. `Scripts/fuzz` builds it with `-sanitize=fuzzer,address -DFUZZING`: libFuzzer supplies `main`
// and calls `LLVMFuzzerTestOneInput` with each input for the target named by `DLLAVA_FUZZ_TARGET`. The normal
// build gives a plain `main` that replays saved inputs through a target (`dllava-fuzz TARGET FILE...`), to
// reproduce a finding without the sanitizers, and lists the targets (`dllava-fuzz --list`).

/// The target `DLLAVA_FUZZ_TARGET` names; exits with 64 naming the known ones when it names none.
func selectedTarget(named name: String?) -> FuzzTarget {
    guard let name, let target = FuzzTargets.all.first(where: { $0.name == name }) else {
        let known = FuzzTargets.all.map(\.name).joined(separator: ", ")
        FileHandle.standardError.write(Data("dllava-fuzz: unknown target '\(name ?? "")'; the targets are \(known)\n".utf8))
        exit(64)
    }
    return target
}

#if FUZZING
nonisolated(unsafe) var fuzzTarget: FuzzTarget?

@_cdecl("LLVMFuzzerInitialize")
public func fuzzerInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    fuzzTarget = selectedTarget(named: ProcessInfo.processInfo.environment["DLLAVA_FUZZ_TARGET"])
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzerTestOneInput(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    let data = bytes.map { Data(bytes: $0, count: count) } ?? Data()
    fuzzTarget!.run(data)
    return 0
}
#else
@main
enum Replay {
    static func main() {
        let arguments = CommandLine.arguments.dropFirst()
        if arguments.first == "--list" {
            print(FuzzTargets.all.map(\.name).joined(separator: "\n"))
            return
        }
        guard arguments.count >= 2 else {
            FileHandle.standardError.write(Data("usage: dllava-fuzz TARGET FILE... | dllava-fuzz --list\n".utf8))
            exit(64)
        }
        let target = selectedTarget(named: arguments.first)
        for path in arguments.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                FileHandle.standardError.write(Data("dllava-fuzz: cannot read \(path)\n".utf8))
                exit(66)
            }
            target.run(data)
            print("\(path): no crash")
        }
    }
}
#endif
