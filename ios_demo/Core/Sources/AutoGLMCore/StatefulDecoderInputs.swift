import Foundation

/// Per rotary pair of the decoder's head: its inverse frequency and which position axis (t, h, w) drives it.
public struct RopeTable {
    public let invFreq: [Float]
    public let axis: [Int]
}

/// Host-side inputs of the Core ML stateful decoder (autoglm_export/host/static_decoder.py): the
/// package keeps no position math, so the app computes M-RoPE cos/sin and the additive mask.
public enum StatefulDecoderInputs {
    /// Finite: -inf would become NaN in an fp16 program; exp of this is 0 in fp16.
    public static let maskFill: Float = -1.0e4

    /// cos, sin [1, 1, T, head_dim] from 3-axis positions laid out [3, T]; pairs share a frequency.
    public static func cosSin(_ rope: RopeTable, positions: [Int64], t: Int) -> (cos: [Float], sin: [Float]) {
        let half = rope.invFreq.count
        var cos = [Float](repeating: 0, count: t * 2 * half)
        var sin = cos
        for i in 0..<t {
            for j in 0..<half {
                let f = Float(positions[rope.axis[j] * t + i]) * rope.invFreq[j] // float32, as the host
                let c = Float(Foundation.cos(Double(f))), s = Float(Foundation.sin(Double(f)))
                cos[i * 2 * half + 2 * j] = c
                cos[i * 2 * half + 2 * j + 1] = c
                sin[i * 2 * half + 2 * j] = s
                sin[i * 2 * half + 2 * j + 1] = s
            }
        }
        return (cos, sin)
    }

    /// [1, 1, T, C] over every cache slot (the new tokens are written into the state first):
    /// 0 where slot <= start + i, `maskFill` elsewhere.
    public static func additiveMask(start: Int, t: Int, context: Int) -> [Float] {
        var m = [Float](repeating: maskFill, count: t * context)
        for i in 0..<t {
            for j in 0...min(start + i, context - 1) { m[i * context + j] = 0 }
        }
        return m
    }
}
