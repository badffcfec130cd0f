// swift-tools-version:5.9
// The iOS demo's logic with no UI: manifest, prompt, pixels, log-mel, positions, generation loop.
// `swift test` runs its XCTest suite against golden vectors (GOLDEN_DIR, written by
// scripts/make_golden.py --bundle); .github/workflows/ios.yml does that on a macOS runner.
import PackageDescription

let package = Package(
    name: "AutoGLMCore",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.library(name: "AutoGLMCore", targets: ["AutoGLMCore"])],
    dependencies: [
        // Hugging Face's maintained Swift tokenizers (tokenizer.json, byte-level BPE)
        .package(url: "https://github.com/huggingface/swift-transformers", from: "0.1.21"),
    ],
    targets: [
        .target(name: "AutoGLMCore", dependencies: [.product(name: "Tokenizers", package: "swift-transformers")]),
        .testTarget(name: "AutoGLMCoreTests", dependencies: ["AutoGLMCore"]),
    ]
)
