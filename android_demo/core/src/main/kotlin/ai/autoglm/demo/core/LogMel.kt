package ai.autoglm.demo.core

/**
 * Whisper-style log-mel features for the audio encoder, matching the exporter's host code (and
 * transformers' WhisperFeatureExtractor): zero-pad to the window, reflect-pad n_fft/2, periodic
 * Hann window, power spectrum, Slaney mel filters (0 .. sample_rate/2), log10 with a 1e-10 floor,
 * clamp to max - 8, (x + 4) / 4, drop the last frame. Output [1, mel_bins, frames] float32.
 */
object LogMel {

    fun compute(wave: FloatArray, cfg: AudioConfig): FloatTensor {
        if (wave.size > cfg.samples) {
            throw IllegalArgumentException("audio of ${wave.size} samples is longer than the bundle's window of ${cfg.samples}")
        }
        val nFft = cfg.nFft
        val half = nFft / 2
        val x = DoubleArray(cfg.samples)
        for (i in wave.indices) x[i] = wave[i].toDouble()
        val padded = DoubleArray(cfg.samples + nFft)
        for (i in 0 until cfg.samples) padded[half + i] = x[i]
        for (i in 1..half) {
            padded[half - i] = x[i]
            padded[half + cfg.samples - 1 + i] = x[cfg.samples - 1 - i]
        }
        val window = DoubleArray(nFft) { 0.5 - 0.5 * Math.cos(2.0 * Math.PI * it / nFft) }
        val bins = nFft / 2 + 1
        val cos = DoubleArray(nFft) { Math.cos(2.0 * Math.PI * it / nFft) }
        val sin = DoubleArray(nFft) { Math.sin(2.0 * Math.PI * it / nFft) }
        val filters = melFilters(cfg.melBins, nFft, cfg.sampleRate)
        val nFrames = 1 + (padded.size - nFft) / cfg.hopLength
        val frames = cfg.frames
        val spec = DoubleArray(cfg.melBins * frames)
        val seg = DoubleArray(nFft)
        val power = DoubleArray(bins)
        for (f in 0 until Math.min(nFrames, frames)) { // the last frame is dropped, so never computed
            for (n in 0 until nFft) seg[n] = padded[f * cfg.hopLength + n] * window[n]
            for (k in 0 until bins) {
                var re = 0.0
                var im = 0.0
                var idx = 0
                for (n in 0 until nFft) {
                    re += seg[n] * cos[idx]
                    im -= seg[n] * sin[idx]
                    idx += k
                    if (idx >= nFft) idx -= nFft
                }
                power[k] = re * re + im * im
            }
            for (m in 0 until cfg.melBins) {
                var acc = 0.0
                for (k in 0 until bins) acc += power[k] * filters[k * cfg.melBins + m]
                spec[m * frames + f] = Math.log10(Math.max(acc, 1e-10))
            }
        }
        var max = Double.NEGATIVE_INFINITY
        for (v in spec) if (v > max) max = v
        val out = FloatArray(spec.size) { i -> ((Math.max(spec[i], max - 8.0) + 4.0) / 4.0).toFloat() }
        return FloatTensor(intArrayOf(1, cfg.melBins, frames), out)
    }

    private fun hzToMel(f: Double): Double {
        val fSp = 200.0 / 3
        val minLogHz = 1000.0
        val minLogMel = minLogHz / fSp
        val logStep = Math.log(6.4) / 27.0
        return if (f >= minLogHz) minLogMel + Math.log(Math.max(f, 1e-10) / minLogHz) / logStep else f / fSp
    }

    private fun melToHz(m: Double): Double {
        val fSp = 200.0 / 3
        val minLogHz = 1000.0
        val minLogMel = minLogHz / fSp
        val logStep = Math.log(6.4) / 27.0
        return if (m >= minLogMel) minLogHz * Math.exp(logStep * (m - minLogMel)) else fSp * m
    }

    /** numpy.linspace: start + i * step, the last value exactly `stop`. */
    private fun linspace(start: Double, stop: Double, n: Int): DoubleArray {
        val step = (stop - start) / (n - 1)
        val out = DoubleArray(n) { start + it * step }
        out[n - 1] = stop
        return out
    }

    /** Slaney-scale, Slaney-normalised triangular filters, [n_fft / 2 + 1, mel_bins] row-major. */
    fun melFilters(melBins: Int, nFft: Int, sampleRate: Int): DoubleArray {
        val bins = nFft / 2 + 1
        val fftFreqs = linspace(0.0, sampleRate / 2.0, bins)
        val melPts = linspace(hzToMel(0.0), hzToMel(sampleRate / 2.0), melBins + 2)
        val hz = DoubleArray(melPts.size) { melToHz(melPts[it]) }
        val out = DoubleArray(bins * melBins)
        for (k in 0 until bins) for (m in 0 until melBins) {
            val down = -(hz[m] - fftFreqs[k]) / (hz[m + 1] - hz[m])
            val up = (hz[m + 2] - fftFreqs[k]) / (hz[m + 2] - hz[m + 1])
            val v = Math.max(0.0, Math.min(down, up))
            out[k * melBins + m] = v * (2.0 / (hz[m + 2] - hz[m]))
        }
        return out
    }
}
