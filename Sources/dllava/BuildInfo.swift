import CBuildInfo
import Foundation

/// What `dllava --version` prints, and where an installed dllava finds its default model.
enum BuildInfo {
    /// The release's version; raised with each release.
    static let version = "0.14.0"
    /// The commit the binary was built from (Scripts/install and Scripts/demo record it), or "unknown".
    static let sourceCommit = String(cString: dl_source_commit())
    static let versionLine = "\(version) (commit \(sourceCommit))"

    /// `<prefix>/share/dllava/models/dllava-scenes` beside `<prefix>/bin/dllava`, where Scripts/install puts the
    /// default model, when it is there.
    static var installedModel: String? {
        // The executable's own path (argv[0] is only "dllava" when it was found on PATH).
        let executable = (Bundle.main.executableURL ?? URL(fileURLWithPath: CommandLine.arguments[0])).resolvingSymlinksInPath()
        let model = executable.deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("share/dllava/models/dllava-scenes")
        return FileManager.default.fileExists(atPath: model.appendingPathComponent("config.json").path) ? model.path : nil
    }

    /// `--model`, else $DLLAVA_MODEL, else the installed default model.
    static func modelDirectory(_ option: String?) -> String? {
        option ?? ProcessInfo.processInfo.environment["DLLAVA_MODEL"] ?? installedModel
    }
}
