import AutoGLMCore
import CoreML
import Foundation

/// The bundle's components through Core ML (iOS 18): each `.mlpackage` is compiled once on first
/// launch, loaded for the Neural Engine, and called by the input names the manifest lists. The
/// decoder is a multifunction package ("prefill" for a full chunk, "decode" for one token) whose
/// KV cache is Core ML state shared by both functions; a shorter last prefill chunk runs token by
/// token through "decode", so the shared generation loop stays the same on every platform.
final class CoreMLRuntime: ModelRuntime {
    let manifest: BundleManifest
    let dir: URL
    var models: [String: MLModel] = [:]
    var state: MLState?

    var maxContext: Int { manifest.maxContext }
    var prefillChunk: Int { manifest.prefillChunk }

    init(dir: URL, manifest: BundleManifest) {
        self.dir = dir
        self.manifest = manifest
    }

    func model(_ component: String, function: String? = nil) throws -> MLModel {
        let spec = try manifest.component(component)
        let key = spec.file + "#" + (function ?? "")
        if let m = models[key] { return m }
        let compiled = try MLModel.compileModel(at: dir.appendingPathComponent(spec.file))
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

    func run(_ component: String, _ inputs: [String: MLMultiArray], function: String? = nil) throws -> FloatTensor {
        let m = try model(component, function: function)
        let provider = try MLDictionaryFeatureProvider(dictionary: inputs)
        let out: MLFeatureProvider
        if component == BundleManifest.decoder {
            if state == nil { state = m.makeState() }
            out = try m.prediction(from: provider, using: state!)
        } else {
            out = try m.prediction(from: provider)
        }
        let name = try manifest.component(component).outputs[0].name
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
        try run(BundleManifest.embedding, [try inputName(BundleManifest.embedding, 0): try array(inputIds.data, inputIds.shape)])
    }

    func visionEncoder(_ pixelValues: FloatTensor) throws -> FloatTensor {
        try run(BundleManifest.vision, [try inputName(BundleManifest.vision, 0): try array(pixelValues.data, pixelValues.shape)])
    }

    func audioEncoder(_ inputFeatures: FloatTensor) throws -> FloatTensor {
        try run(BundleManifest.audioEncoder, [try inputName(BundleManifest.audioEncoder, 0): try array(inputFeatures.data, inputFeatures.shape)])
    }

    func textDecoder(_ embeds: FloatTensor, _ positionIds: LongTensor, _ cachePosition: LongTensor) throws -> FloatTensor {
        let t = cachePosition.data.count, h = embeds.shape[2]
        let d = BundleManifest.decoder
        if t == prefillChunk {
            return try run(d, [try inputName(d, 0): try array(embeds.data, embeds.shape),
                               try inputName(d, 1): try array(positionIds.data, positionIds.shape),
                               try inputName(d, 2): try array(cachePosition.data, cachePosition.shape)], function: "prefill")
        }
        var logits: FloatTensor?
        for j in 0..<t { // static shapes: a short chunk goes through the one-token function
            let row = Array(embeds.data[(j * h)..<((j + 1) * h)])
            let pos = [positionIds.data[j], positionIds.data[t + j], positionIds.data[2 * t + j]]
            logits = try run(d, [try inputName(d, 0): try array(row, [1, 1, h]),
                                 try inputName(d, 1): try array(pos, [3, 1]),
                                 try inputName(d, 2): try array([cachePosition.data[j]], [1])], function: "decode")
        }
        return logits!
    }

    func reset() throws {
        state = nil // a fresh KV cache for the next conversation
    }
}
