import Foundation

/// Whisper-style log-mel features, matching the exporter's host front end: zero-pad to the window,
/// reflect-pad n_fft/2, periodic Hann, power spectrum, Slaney mel filters, log10 (floor 1e-10),
/// clamp to max - 8, (x + 4) / 4, last frame dropped. Output [1, mel_bins, frames].
public enum LogMel {
    public static func compute(_ wave: [Float], _ c: AudioConfig) throws -> FloatTensor {
        guard wave.count <= c.samples else {
            throw BundleError(file: "audio", field: nil, expected: "at most \(c.samples) samples", got: "\(wave.count)",
                              fix: "record a shorter clip")
        }
        let nFft = c.nFft, half = nFft / 2, bins = nFft / 2 + 1
        var padded = [Double](repeating: 0, count: c.samples + nFft)
        for (i, v) in wave.enumerated() { padded[half + i] = Double(v) }
        for i in 1...half {
            padded[half - i] = padded[half + i]
            padded[half + c.samples - 1 + i] = padded[half + c.samples - 1 - i]
        }
        let window = (0..<nFft).map { 0.5 - 0.5 * cos(2.0 * Double.pi * Double($0) / Double(nFft)) }
        let cosT = (0..<nFft).map { cos(2.0 * Double.pi * Double($0) / Double(nFft)) }
        let sinT = (0..<nFft).map { sin(2.0 * Double.pi * Double($0) / Double(nFft)) }
        let filters = melFilters(c.melBins, nFft, c.sampleRate)
        let frames = c.frames
        var spec = [Double](repeating: 0, count: c.melBins * frames)
        var seg = [Double](repeating: 0, count: nFft)
        var power = [Double](repeating: 0, count: bins)
        for f in 0..<frames {
            for n in 0..<nFft { seg[n] = padded[f * c.hopLength + n] * window[n] }
            for k in 0..<bins {
                var re = 0.0, im = 0.0, idx = 0
                for n in 0..<nFft {
                    re += seg[n] * cosT[idx]
                    im -= seg[n] * sinT[idx]
                    idx += k
                    if idx >= nFft { idx -= nFft }
                }
                power[k] = re * re + im * im
            }
            for m in 0..<c.melBins {
                var acc = 0.0
                for k in 0..<bins { acc += power[k] * filters[k * c.melBins + m] }
                spec[m * frames + f] = log10(max(acc, 1e-10))
            }
        }
        let top = spec.max() ?? 0
        return FloatTensor(shape: [1, c.melBins, frames], data: spec.map { Float((max($0, top - 8.0) + 4.0) / 4.0) })
    }

    static func hzToMel(_ f: Double) -> Double {
        let fSp = 200.0 / 3, minLogHz = 1000.0, minLogMel = minLogHz / fSp, logStep = log(6.4) / 27.0
        return f >= minLogHz ? minLogMel + log(max(f, 1e-10) / minLogHz) / logStep : f / fSp
    }

    static func melToHz(_ m: Double) -> Double {
        let fSp = 200.0 / 3, minLogHz = 1000.0, minLogMel = minLogHz / fSp, logStep = log(6.4) / 27.0
        return m >= minLogMel ? minLogHz * exp(logStep * (m - minLogMel)) : fSp * m
    }

    static func linspace(_ a: Double, _ b: Double, _ n: Int) -> [Double] {
        let step = (b - a) / Double(n - 1)
        var out = (0..<n).map { a + Double($0) * step }
        out[n - 1] = b
        return out
    }

    /// Slaney-scale, Slaney-normalised triangular filters, [n_fft / 2 + 1, mel_bins] row-major.
    public static func melFilters(_ melBins: Int, _ nFft: Int, _ sampleRate: Int) -> [Double] {
        let bins = nFft / 2 + 1
        let freqs = linspace(0, Double(sampleRate) / 2, bins)
        let hz = linspace(hzToMel(0), hzToMel(Double(sampleRate) / 2), melBins + 2).map(melToHz)
        var out = [Double](repeating: 0, count: bins * melBins)
        for k in 0..<bins { for m in 0..<melBins {
            let down = -(hz[m] - freqs[k]) / (hz[m + 1] - hz[m])
            let up = (hz[m + 2] - freqs[k]) / (hz[m + 2] - hz[m + 1])
            out[k * melBins + m] = max(0, min(down, up)) * (2.0 / (hz[m + 2] - hz[m]))
        } }
        return out
    }
}
