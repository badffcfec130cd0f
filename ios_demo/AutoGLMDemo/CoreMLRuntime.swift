import AutoGLMCore
import CoreML
import Foundation

/// The bundle's components through Core ML (iOS 18): each `.mlpackage` is compiled once on first
/// launch, loaded for the Neural Engine, and called by the input names the manifest lists. The
/// token embedding and the decoder are multifunction packages ("prefill" for a full chunk,
/// "decode" for one token); the decoder's KV cache is Core ML state shared by both functions and
/// its cos/sin/mask are computed here (`StatefulDecoderInputs`); a shorter last prefill chunk runs
/// token by token through "decode", so the shared generation loop stays the same everywhere.
/// A decoder lowered in parts is one package per run of layers, called in order with the previous
/// part's hidden states, each with its own state (its layers' KV cache).
final class CoreMLRuntime: ModelRuntime {
    let manifest: BundleManifest
    let dir: URL
    var models: [String: MLModel] = [:]
    var states: [String: MLState] = [:]
    var compiledURLs: [String: URL] = [:]

    var maxContext: Int { manifest.maxContext }
    var prefillChunk: Int { manifest.prefillChunk }

    init(dir: URL, manifest: BundleManifest) {
        self.dir = dir
        self.manifest = manifest
    }

    func model(_ component: String, function: String? = nil, file: String? = nil) throws -> MLModel {
        let path = try file ?? manifest.component(component).file
        let key = path + "#" + (function ?? "")
        if let m = models[key] { return m }
        let compiled = try compiledURLs[path] ?? MLModel.compileModel(at: dir.appendingPathComponent(path))
        compiledURLs[path] = compiled  // one compilation per package, whichever functions are loaded
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndNeuralEngine
        if let function { config.functionName = function }
        let m = try MLModel(contentsOf: compiled, configuration: config)
        models[key] = m
        return m
    }

    func array(_ data: [Float], _ shape: [Int]) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
        data.withUnsafeBufferPointer { src in
            a.dataPointer.assumingMemoryBound(to: Float.self).update(from: src.baseAddress!, count: data.count)
        }
        return a
    }

    func array(_ data: [Int64], _ shape: [Int]) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .int32)
        for (i, v) in data.enumerated() { a[i] = NSNumber(value: Int32(v)) }
        return a
    }

    func run(_ component: String, _ inputs: [String: MLMultiArray], function: String? = nil, file: String? = nil,
             output: String? = nil) throws -> FloatTensor {
        let m = try model(component, function: function, file: file)
        let provider = try MLDictionaryFeatureProvider(dictionary: inputs)
        let out: MLFeatureProvider
        if component == BundleManifest.decoder {
            let key = try file ?? manifest.component(component).file
            if states[key] == nil { states[key] = m.makeState() }
            out = try m.prediction(from: provider, using: states[key]!)
        } else {
            out = try m.prediction(from: provider)
        }
        let name = try output ?? manifest.component(component).outputs[0].name
        guard let a = out.featureValue(for: name)?.multiArrayValue else {
            throw BundleError(file: component, field: name, expected: "a multi-array output", got: nil, fix: "re-export the bundle")
        }
        let n = a.count
        var data = [Float](repeating: 0, count: n)
        for i in 0..<n { data[i] = a[i].floatValue }
        return FloatTensor(shape: a.shape.map { $0.intValue }, data: data)
    }

    func inputName(_ component: String, _ i: Int) throws -> String { try manifest.component(component).inputs[i].name }

    func tokenEmbedding(_ inputIds: LongTensor) throws -> FloatTensor {
        // a multifunction package too: a full chunk through "prefill", anything shorter id by id
        let e = BundleManifest.embedding, name = try inputName(e, 0), t = inputIds.data.count
        if t == prefillChunk {
            return try run(e, [name: try array(inputIds.data, [1, t])], function: "prefill")
        }
        var data: [Float] = []
        for id in inputIds.data {
            data += try run(e, [name: try array([id], [1, 1])], function: "decode").data
        }
        return FloatTensor(shape: [1, t, manifest.hiddenSize], data: data)
    }

    func visionEncoder(_ pixelValues: FloatTensor, method: String) throws -> FloatTensor {
        // the image buckets are functions of one package: the manifest names this bucket's
        try run(method, [try inputName(method, 0): try array(pixelValues.data, pixelValues.shape)],
                function: try manifest.component(method).function)
    }

    func audioEncoder(_ inputFeatures: FloatTensor) throws -> FloatTensor {
        try run(BundleManifest.audioEncoder, [try inputName(BundleManifest.audioEncoder, 0): try array(inputFeatures.data, inputFeatures.shape)])
    }

    /// One decoder call: the package takes inputs_embeds, cos, sin, mask and cache_start (its
    /// KV cache is state); cos/sin/mask come from the manifest's rotary table, like the host.
    func decoderCall(_ function: String, _ embeds: [Float], _ pos: [Int64], start: Int, t: Int) throws -> FloatTensor {
        guard let rope = manifest.rope else {
            throw BundleError(file: BundleManifest.fileName, field: "components.text_decoder.rope", expected: "the rotary table",
                              got: nil, fix: "re-export with autoglm-export --target coreml")
        }
        let h = manifest.hiddenSize, hd = 2 * rope.invFreq.count, c = maxContext
        let cs = StatefulDecoderInputs.cosSin(rope, positions: pos, t: t)
        let mask = StatefulDecoderInputs.additiveMask(start: start, t: t, context: c)
        let start32 = try MLMultiArray(shape: [1], dataType: .int32)
        start32[0] = NSNumber(value: Int32(start))
        let shared = ["cos": try array(cs.cos, [1, 1, t, hd]), "sin": try array(cs.sin, [1, 1, t, hd]),
                      "mask": try array(mask, [1, 1, t, c]), "cache_start": start32]
        let parts = try manifest.component(BundleManifest.decoder).programs
        var x = FloatTensor(shape: [1, t, h], data: embeds)
        for (i, part) in parts.enumerated() { // every part but the last returns hidden states for the next
            let inputs = shared.merging(["inputs_embeds": try array(x.data, [1, t, h])]) { a, _ in a }
            x = try run(BundleManifest.decoder, inputs, function: function, file: part.file,
                        output: i == parts.count - 1 ? nil : "hidden_states")
        }
        return x
    }

    func textDecoder(_ embeds: FloatTensor, _ positionIds: LongTensor, _ cachePosition: LongTensor) throws -> FloatTensor {
        let t = cachePosition.data.count, h = embeds.shape[2]
        if t == prefillChunk {
            return try decoderCall("prefill", embeds.data, positionIds.data, start: Int(cachePosition.data[0]), t: t)
        }
        var logits: FloatTensor?
        for j in 0..<t { // static shapes: a short chunk goes through the one-token function
            let row = Array(embeds.data[(j * h)..<((j + 1) * h)])
            let pos = [positionIds.data[j], positionIds.data[t + j], positionIds.data[2 * t + j]]
            logits = try decoderCall("decode", row, pos, start: Int(cachePosition.data[j]), t: 1)
        }
        return logits!
    }

    func reset() throws {
        states = [:] // a fresh KV cache (every part's) for the next conversation
    }
}
