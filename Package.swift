// swift-tools-version:6.0
import PackageDescription

// Targets form a layered DAG; see README.md and ../shared/design/ARCHITECTURE.md.
let package = Package(
    name: "dllava",
    platforms: [.macOS(.v14)],
    products: [],
    dependencies: [],
    targets: [
        // System libraries (Debian -dev packages, installed by Scripts/setup).
        .systemLibrary(name: "CBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CJPEG", pkgConfig: "libturbojpeg", providers: [.apt(["libturbojpeg0-dev"])]),
        .systemLibrary(name: "CPNG", pkgConfig: "spng", providers: [.apt(["libspng-dev"])]),

        // LLaMA's sentencepiece tokenizer and the LLaVA prompt (Foundation only).
        .target(name: "Tokenizer"),
        .testTarget(name: "TokenizerTests", dependencies: ["Tokenizer"], resources: [.copy("Fixtures")]),
    ]
)
