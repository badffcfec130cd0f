import CryptoKit
import Foundation

public struct TensorSpec {
    public let name: String
    public let shape: [String]
    public let dtype: String
}

/// One package of a component; for a decoder lowered in parts, the one holding layers [first, end).
public struct ProgramSpec {
    public let file: String
    public let firstLayer: Int
    public let endLayer: Int
}

/// A component of the bundle and its signature. A decoder lowered in parts (recipe
/// `lowering.decoder_layers_per_program`) has several `programs`, run in order: each takes the
/// previous one's hidden states and keeps the KV cache (Core ML state) of its own layers.
public struct ComponentSpec {
    public let name: String
    public let method: String
    public let file: String
    /// The function of a multifunction package that is this component (Core ML: the image buckets
    /// are functions of one `vision_encoder.mlpackage`); nil for a package's default function.
    public let function: String?
    public let inputs: [TensorSpec]
    public let outputs: [TensorSpec]
    public let programs: [ProgramSpec]
}

/// One image size of the bundle (preprocessing.buckets) and the vision method compiled for it.
public struct ImageBucket {
    public let height: Int
    public let width: Int
    public let method: String
}

/// Image preprocessing at one bucket's size (the first bucket's, `vision_encoder`, unless `at` picked
/// another); `choose` finds the bucket closest to an image in aspect ratio, as the exporter's host code.
public struct ImageConfig {
    public let height: Int
    public let width: Int
    public let patchSize: Int
    public let mergeSize: Int
    public let rescaleFactor: Double
    public let mean: [Double]
    public let std: [Double]
    public var gridRows: Int { height / patchSize }
    public var gridCols: Int { width / patchSize }
    /// (rows, cols) of the image tokens after the merge: their count and their M-RoPE layout.
    public var mergedShape: (Int, Int) { (gridRows / mergeSize, gridCols / mergeSize) }
    public var numTokens: Int { (gridRows / mergeSize) * (gridCols / mergeSize) }
    public var buckets: [ImageBucket] = []

    /// The bucket closest to a `w` x `h` image in aspect ratio (log scale), the first on a tie.
    public func choose(width w: Int, height h: Int) -> ImageBucket {
        let ratio = log(Double(max(w, 1)) / Double(max(h, 1)))
        var best = buckets[0]
        for b in buckets.dropFirst() where abs(ratio - log(Double(b.width) / Double(b.height)))
            < abs(ratio - log(Double(best.width) / Double(best.height))) {
            best = b
        }
        return best
    }

    /// This preprocessing at `bucket`'s size.
    public func at(_ bucket: ImageBucket) -> ImageConfig {
        var c = ImageConfig(height: bucket.height, width: bucket.width, patchSize: patchSize, mergeSize: mergeSize,
                            rescaleFactor: rescaleFactor, mean: mean, std: std)
        c.buckets = buckets
        return c
    }
}

public struct AudioConfig {
    public let frames: Int
    public let melBins: Int
    public let sampleRate: Int
    public let nFft: Int
    public let hopLength: Int
    public var samples: Int { frames * hopLength }
}

/// `layout`: the chat template as token pieces; `layoutWritten` false for bundles written before
/// `prompt.layout` (GLM-4.1V's built-in layout then); written but nil when the exporter found the
/// template inexpressible as pieces (`layoutUnavailable` says why).
public struct PromptConfig {
    public let specialIds: [String: Int]
    public let eosIds: [Int]
    public var layout: PromptLayout? = nil
    public var layoutWritten = false
    public var layoutUnavailable: String? = nil

    /// The pieces conversations are assembled from; refuses a bundle whose template has none.
    public func chatLayout(_ tokenizer: TextEncoder) throws -> PromptLayout {
        if let l = layout { return l }
        if !layoutWritten { return try PromptLayout.builtin(tokenizer, self) }
        throw BundleError(file: BundleManifest.fileName, field: "prompt.layout", expected: "the chat template as token pieces",
                          got: "none (\((layoutUnavailable ?? "no reason given").prefix(160)))",
                          fix: "chat with this bundle through `autoglm-export serve`, or export a checkpoint whose template the apps can follow")
    }

    public func special(_ name: String) throws -> Int {
        guard let id = specialIds[name] else {
            throw BundleError(file: BundleManifest.fileName, field: "prompt.special_ids.\(name)",
                              expected: "the id of the chat token '\(name)'", got: "nothing", fix: JsonNode.reexport)
        }
        return id
    }
}

/// The bundle's manifest.json as the app needs it; nothing model-specific is hard-coded in the app.
public struct BundleManifest {
    public static let fileName = "manifest.json"
    public static let schemaVersion = 1
    public static let vision = "vision_encoder"
    public static let embedding = "token_embedding"
    public static let decoder = "text_decoder"
    public static let audioEncoder = "audio_encoder"

    public let target: String
    public let files: [String: (bytes: Int, sha256: String)]
    public let components: [String: ComponentSpec]
    public let maxContext: Int
    public let prefillChunk: Int
    public let image: ImageConfig
    public let audio: AudioConfig?
    public let prompt: PromptConfig
    public let vocabSize: Int
    public let hiddenSize: Int
    /// The decoder's rotary table (Core ML bundles: the app computes cos/sin for the stateful decoder).
    public let rope: RopeTable?

    public var audioTokens: Int? {
        guard let c = components[Self.audioEncoder], let rows = c.outputs.first?.shape.first else { return nil }
        return Int(rows)
    }

    public func component(_ name: String) throws -> ComponentSpec {
        guard let c = components[name] else {
            throw BundleError(file: Self.fileName, field: "components.\(name)", expected: "a '\(name)' component",
                              got: "none", fix: "export the bundle from a checkpoint that has it")
        }
        return c
    }

    public static func parse(_ data: Data, file: String = fileName) throws -> BundleManifest {
        let root = try JsonNode.parse(data, file: file)
        let version = try root.reqInt("schema_version")
        guard version == schemaVersion else {
            throw BundleError(file: file, field: "schema_version", expected: "\(schemaVersion)", got: "\(version)",
                              fix: "use an app built for this bundle format, or re-export")
        }
        let filesNode = try root.reqObj("files")
        var files: [String: (bytes: Int, sha256: String)] = [:]
        for name in filesNode.obj.keys.sorted() {
            let f = try filesNode.reqObj(name)
            files[name] = (try f.reqInt("bytes"), try f.reqString("sha256"))
        }
        let compsNode = try root.reqObj("components")
        var comps: [String: ComponentSpec] = [:]
        var rope: RopeTable?
        for name in compsNode.obj.keys.sorted() {
            let c = try compsNode.reqObj(name)
            if let r = try c.optObj("rope") {
                rope = RopeTable(invFreq: try r.reqDoubles("inv_freq").map { Float($0) }, axis: try r.reqInts("axis"))
            }
            let mainFile = try c.reqString("file")
            var programs = [ProgramSpec(file: mainFile, firstLayer: 0, endLayer: 0)]
            if c.opt("programs") != nil {
                programs = []
                for (i, v) in try c.reqArray("programs").enumerated() {
                    let p = try c.child("programs[\(i)]", v)
                    let layers = try p.reqInts("layers")
                    if i > 0 && layers[0] != programs[i - 1].endLayer {
                        throw BundleError(file: file, field: "components.\(name).programs[\(i)].layers",
                                          expected: "layers starting at \(programs[i - 1].endLayer)", got: "\(layers[0])", fix: JsonNode.reexport)
                    }
                    programs.append(ProgramSpec(file: try p.reqString("file"), firstLayer: layers[0], endLayer: layers[1]))
                }
            }
            comps[name] = ComponentSpec(name: name, method: try c.reqString("method"), file: mainFile,
                                        function: c.opt("function") as? String, inputs: try specs(c, "inputs"), outputs: try specs(c, "outputs"), programs: programs)
        }
        let shapes = try root.reqObj("shapes")
        let pre = try root.reqObj("preprocessing")
        let resample = try pre.reqString("resample")
        guard resample == "bicubic" else {
            throw BundleError(file: file, field: "preprocessing.resample", expected: "bicubic", got: resample, fix: JsonNode.reexport)
        }
        let buckets = try pre.reqArray("buckets")
        guard !buckets.isEmpty else {
            throw BundleError(file: file, field: "preprocessing.buckets", expected: "at least one image bucket", got: "[]", fix: JsonNode.reexport)
        }
        var sizes: [ImageBucket] = []
        for (i, value) in buckets.enumerated() {
            let b = try pre.child("buckets", value)
            let method = try b.reqString("method")
            guard (i > 0 || method == Self.vision) && comps[method] != nil else {
                throw BundleError(file: file, field: "preprocessing.buckets[\(i)].method", expected: "a vision component of the bundle",
                                  got: method, fix: JsonNode.reexport)
            }
            sizes.append(ImageBucket(height: try b.reqInt("height"), width: try b.reqInt("width"), method: method))
        }
        var image = ImageConfig(height: sizes[0].height, width: sizes[0].width, patchSize: try pre.reqInt("patch_size"),
                                mergeSize: try pre.reqInt("merge_size"), rescaleFactor: try pre.reqDouble("rescale_factor"),
                                mean: try pre.reqDoubles("image_mean"), std: try pre.reqDoubles("image_std"))
        image.buckets = sizes
        var audio: AudioConfig?
        if let a = try root.optObj("audio_preprocessing") {
            audio = AudioConfig(frames: try a.reqInt("frames"), melBins: try a.reqInt("mel_bins"),
                                sampleRate: try a.reqInt("sample_rate"), nFft: try a.reqInt("n_fft"),
                                hopLength: try a.reqInt("hop_length"))
        }
        let promptNode = try root.reqObj("prompt")
        let sp = try promptNode.reqObj("special_ids")
        var special: [String: Int] = [:]
        for k in sp.obj.keys { special[k] = try sp.reqInt(k) }
        let text = try root.reqObj("model").reqObj("text")
        let scheme = try root.reqObj("positions").reqString("scheme")
        guard scheme == "mrope-3axis" else {
            throw BundleError(file: file, field: "positions.scheme", expected: "mrope-3axis", got: scheme,
                              fix: "use an app that implements this position scheme")
        }
        return BundleManifest(target: try root.reqString("target"), files: files, components: comps,
                              maxContext: try shapes.reqInt("max_context"), prefillChunk: try shapes.reqInt("prefill_chunk"),
                              image: image, audio: audio,
                              prompt: PromptConfig(specialIds: special, eosIds: try promptNode.reqInts("eos_ids"),
                                                   layout: try promptNode.optObj("layout").map { try PromptLayout.parse($0) },
                                                   layoutWritten: promptNode.obj["layout"] != nil,
                                                   layoutUnavailable: promptNode.opt("layout_unavailable") as? String),
                              vocabSize: try text.reqInt("vocab_size"), hiddenSize: try text.reqInt("hidden_size"), rope: rope)
    }

    static func specs(_ c: JsonNode, _ key: String) throws -> [TensorSpec] {
        try c.reqArray(key).enumerated().map { i, v in
            let t = try c.child("\(key)[\(i)]", v)
            let shape = try t.reqArray("shape").map { "\($0)" }
            return TensorSpec(name: try t.reqString("name"), shape: shape, dtype: try t.reqString("dtype"))
        }
    }

    /// Read a bundle directory and check every file's size and SHA-256 before anything loads.
    public static func load(_ dir: URL) throws -> BundleManifest {
        let url = dir.appendingPathComponent(fileName)
        guard let data = try? Data(contentsOf: url) else {
            throw BundleError(file: url.path, field: nil, expected: "a bundle's manifest.json", got: "no such file",
                              fix: "copy the whole --out directory of autoglm-export into the app's Documents")
        }
        let m = try parse(data, file: url.path)
        for (name, entry) in m.files {
            let f = dir.appendingPathComponent(name)
            guard let bytes = try? Data(contentsOf: f, options: .mappedIfSafe), bytes.count == entry.bytes else {
                throw BundleError(file: f.path, field: nil, expected: "\(entry.bytes) bytes", got: nil, fix: "copy the bundle again; it is incomplete")
            }
            let digest = SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
            guard digest == entry.sha256 else {
                throw BundleError(file: f.path, field: "files.\(name).sha256", expected: entry.sha256, got: digest,
                                  fix: "copy the bundle again; this file is corrupted")
            }
        }
        return m
    }
}
