import Foundation

public struct FloatTensor {
    public let shape: [Int]
    public let data: [Float]
    public init(shape: [Int], data: [Float]) {
        precondition(shape.reduce(1, *) == data.count, "shape \(shape) does not hold \(data.count) values")
        self.shape = shape
        self.data = data
    }
}

public struct LongTensor {
    public let shape: [Int]
    public let data: [Int64]
}

/// Vision encoder input from RGB bytes, bit-compatible with the exporter's host code: Pillow's
/// fixed-point bicubic resize (ported), rescale, normalise, block-major patchify.
/// An image ready for its bucket's vision `method`: `grid` is its merged (rows, cols) of image tokens.
public struct ImageInput {
    public let pixels: FloatTensor
    public let method: String
    public let grid: (Int, Int)
    public var tokens: Int { grid.0 * grid.1 }
}

public enum ImagePreprocessor {
    static let precisionBits = 32 - 8 - 2

    /// `rgb` (width * height * 3 bytes) resized into the bucket closest to it in aspect ratio.
    public static func prepare(rgb: [UInt8], width: Int, height: Int, config c: ImageConfig) -> ImageInput {
        let bucket = c.choose(width: width, height: height)
        let at = c.at(bucket)
        return ImageInput(pixels: preprocess(rgb: rgb, width: width, height: height, config: at), method: bucket.method,
                          grid: at.mergedShape)
    }

    public static func preprocess(rgb: [UInt8], width: Int, height: Int, config c: ImageConfig) -> FloatTensor {
        let oh = c.height, ow = c.width
        let img = (width == ow && height == oh) ? rgb.map { Int($0) } : resizeBicubic(rgb.map { Int($0) }, width, height, ow, oh)
        let scale = Float(c.rescaleFactor)
        let mean = c.mean.map { Float($0) }
        let std = c.std.map { Float($0) }
        let p = c.patchSize, m = c.mergeSize, patches = c.gridRows * c.gridCols, row = 3 * p * p
        var out = [Float](repeating: 0, count: patches * row)
        var o = 0
        for bh in 0..<(c.gridRows / m) { for bw in 0..<(c.gridCols / m) { for mr in 0..<m { for mc in 0..<m {
            for ch in 0..<3 { for py in 0..<p { for px in 0..<p {
                let y = (bh * m + mr) * p + py, x = (bw * m + mc) * p + px
                let v = Float(img[(y * ow + x) * 3 + ch]) * scale
                out[o] = (v - mean[ch]) / std[ch]
                o += 1
            } } }
        } } } }
        return FloatTensor(shape: [patches, row], data: out)
    }

    static func bicubic(_ xIn: Double) -> Double {
        let a = -0.5
        let x = abs(xIn)
        if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 }
        if x < 2.0 { return (((x - 5) * x + 8) * x - 4) * a }
        return 0.0
    }

    static func coeffs(_ inSize: Int, _ outSize: Int) -> (ksize: Int, bounds: [Int], kk: [Int]) {
        let scale = Double(inSize) / Double(outSize)
        let filterScale = max(scale, 1.0)
        let support = 2.0 * filterScale
        let ksize = Int(support.rounded(.up)) * 2 + 1
        var pre = [Double](repeating: 0, count: outSize * ksize)
        var bounds = [Int](repeating: 0, count: outSize * 2)
        for xx in 0..<outSize {
            let center = (Double(xx) + 0.5) * scale
            let ss = 1.0 / filterScale
            let xmin = max(Int(center - support + 0.5), 0)
            let xmax = min(Int(center + support + 0.5), inSize) - xmin
            var ww = 0.0
            for x in 0..<max(xmax, 0) {
                let w = bicubic((Double(x + xmin) - center + 0.5) * ss)
                pre[xx * ksize + x] = w
                ww += w
            }
            if ww != 0 { for x in 0..<max(xmax, 0) { pre[xx * ksize + x] /= ww } }
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        let one = Double(1 << precisionBits)
        let kk = pre.map { $0 < 0 ? Int(-0.5 + $0 * one) : Int(0.5 + $0 * one) }
        return (ksize, bounds, kk)
    }

    static func clip8(_ v: Int) -> Int { min(max(v >> precisionBits, 0), 255) }

    /// Pillow's ImagingResample for 8-bit RGB, bicubic: horizontal pass over the rows the vertical pass needs, then vertical.
    public static func resizeBicubic(_ src: [Int], _ w: Int, _ h: Int, _ outW: Int, _ outH: Int) -> [Int] {
        let hc = coeffs(w, outW), vc = coeffs(h, outH)
        var vb = vc.bounds
        var img = src, iw = w
        if outW != w {
            let first = vb[0], last = vb[outH * 2 - 2] + vb[outH * 2 - 1]
            for i in 0..<outH { vb[i * 2] -= first }
            let rows = last - first
            var tmp = [Int](repeating: 0, count: outW * rows * 3)
            for yy in 0..<rows { for xx in 0..<outW {
                let xmin = hc.bounds[xx * 2], xmax = hc.bounds[xx * 2 + 1]
                for ch in 0..<3 {
                    var ss = 1 << (precisionBits - 1)
                    for x in 0..<xmax { ss += src[((yy + first) * w + x + xmin) * 3 + ch] * hc.kk[xx * hc.ksize + x] }
                    tmp[(yy * outW + xx) * 3 + ch] = clip8(ss)
                }
            } }
            img = tmp
            iw = outW
        }
        if outH == h { return img }
        var out = [Int](repeating: 0, count: iw * outH * 3)
        for yy in 0..<outH {
            let ymin = vb[yy * 2], ymax = vc.bounds[yy * 2 + 1]
            for xx in 0..<iw { for ch in 0..<3 {
                var ss = 1 << (precisionBits - 1)
                for y in 0..<ymax { ss += img[((y + ymin) * iw + xx) * 3 + ch] * vc.kk[yy * vc.ksize + y] }
                out[(yy * iw + xx) * 3 + ch] = clip8(ss)
            } }
        }
        return out
    }
}
