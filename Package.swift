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

        // Image files -> RGB pixels -> CLIP pixel values, as LLaVA-1.5's Python pipeline computes them.
        .target(name: "Imaging", dependencies: ["CJPEG", "CPNG"]),
        .executableTarget(name: "ImagingBenchmark", dependencies: ["Imaging"]),

        .testTarget(name: "ImagingTests", dependencies: ["Imaging"], resources: [.copy("Fixtures")]),
    ]
)
