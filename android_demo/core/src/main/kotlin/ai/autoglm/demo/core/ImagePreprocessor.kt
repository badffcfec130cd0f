package ai.autoglm.demo.core

/**
 * The vision encoder's input from an RGB image, bit-compatible with the exporter's host code:
 * resize to the first image bucket's H x W with Pillow's bicubic filter (its fixed-point two-pass algorithm, ported so
 * the phone feeds the pixels the model was verified with), rescale, normalise, then patchify in
 * block-major order (each merge window contiguous). Output: [N, C * P * P] float32.
 */
/** An image ready for its bucket's vision [method]: [grid] is its merged (rows, cols) of image tokens. */
class ImageInput(val pixels: FloatTensor, val method: String, val grid: IntArray) {
    val tokens: Int get() = grid[0] * grid[1]
}

object ImagePreprocessor {

    /** [rgb] (width * height * 3 bytes) resized into the bucket closest to it in aspect ratio. */
    fun prepare(rgb: IntArray, width: Int, height: Int, cfg: ImageConfig): ImageInput {
        val bucket = cfg.choose(width, height)
        val at = cfg.at(bucket)
        return ImageInput(preprocess(rgb, width, height, at), bucket.method, at.mergedShape)
    }

    /** [rgb] holds width * height * 3 bytes, row-major, as 0..255 ints. */
    fun preprocess(rgb: IntArray, width: Int, height: Int, cfg: ImageConfig): FloatTensor {
        require(rgb.size == width * height * 3) { "rgb holds ${rgb.size} values, expected ${width * height * 3}" }
        val oh = cfg.height
        val ow = cfg.width
        val img = if (width == ow && height == oh) rgb else resizeBicubic(rgb, width, height, ow, oh)
        val scale = cfg.rescaleFactor.toFloat()
        val p = cfg.patchSize
        val m = cfg.mergeSize
        val patches = cfg.gridRows * cfg.gridCols
        val row = 3 * p * p
        val out = FloatArray(patches * row)
        val mean = FloatArray(3) { cfg.mean[it].toFloat() }
        val std = FloatArray(3) { cfg.std[it].toFloat() }
        var token = 0
        for (bh in 0 until cfg.gridRows / m) for (bw in 0 until cfg.gridCols / m) for (mr in 0 until m) for (mc in 0 until m) {
            var o = token * row
            for (c in 0 until 3) for (py in 0 until p) for (px in 0 until p) {
                val y = (bh * m + mr) * p + py
                val x = (bw * m + mc) * p + px
                val v = rgb(img, ow, x, y, c).toFloat() * scale
                out[o++] = (v - mean[c]) / std[c]
            }
            token++
        }
        return FloatTensor(intArrayOf(patches, row), out)
    }

    private fun rgb(img: IntArray, width: Int, x: Int, y: Int, c: Int): Int = img[(y * width + x) * 3 + c]

    /**
     * ARGB pixels as Bitmap.getPixels gives them (not premultiplied) to the RGB bytes [preprocess]
     * takes, transparency composited on white as transformers' image processors do (convert_to_rgb);
     * Pillow's alpha_composite arithmetic on an opaque white background, so the host's pixels match.
     */
    fun rgbOnWhite(argb: IntArray): IntArray {
        val out = IntArray(argb.size * 3)
        for (i in argb.indices) {
            val a = (argb[i] ushr 24) and 0xFF
            for (c in 0 until 3) {
                val v = (argb[i] shr (16 - 8 * c)) and 0xFF
                val coef1 = a * 128 // Pillow: src.a * 255 * 255 * 2^7 / (255 * 255) for an opaque background
                val t = v * coef1 + 255 * (255 * 128 - coef1) + (0x80 shl 7)
                out[3 * i + c] = if (a == 0) 255 else ((((t shr 8) + t) shr 8) shr 7)
            }
        }
        return out
    }

    private const val PRECISION_BITS = 32 - 8 - 2
    private const val SUPPORT = 2.0

    private fun bicubic(xIn: Double): Double {
        val a = -0.5
        val x = if (xIn < 0.0) -xIn else xIn
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a
        return 0.0
    }

    private class Coeffs(val ksize: Int, val bounds: IntArray, val kk: IntArray)

    private fun coeffs(inSize: Int, outSize: Int): Coeffs {
        val scale = inSize.toDouble() / outSize
        val filterScale = if (scale < 1.0) 1.0 else scale
        val support = SUPPORT * filterScale
        val ksize = Math.ceil(support).toInt() * 2 + 1
        val pre = DoubleArray(outSize * ksize)
        val bounds = IntArray(outSize * 2)
        for (xx in 0 until outSize) {
            val center = (xx + 0.5) * scale
            val ss = 1.0 / filterScale
            var xmin = (center - support + 0.5).toInt()
            if (xmin < 0) xmin = 0
            var xmax = (center + support + 0.5).toInt()
            if (xmax > inSize) xmax = inSize
            xmax -= xmin
            var ww = 0.0
            for (x in 0 until xmax) {
                val w = bicubic((x + xmin - center + 0.5) * ss)
                pre[xx * ksize + x] = w
                ww += w
            }
            for (x in 0 until xmax) if (ww != 0.0) pre[xx * ksize + x] /= ww
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        val kk = IntArray(pre.size) { i ->
            val v = pre[i] * (1 shl PRECISION_BITS)
            if (pre[i] < 0) (-0.5 + v).toInt() else (0.5 + v).toInt()
        }
        return Coeffs(ksize, bounds, kk)
    }

    private fun clip8(v: Int): Int {
        val x = v shr PRECISION_BITS
        return if (x < 0) 0 else if (x > 255) 255 else x
    }

    /** Pillow's ImagingResample for 8-bit RGB with the bicubic filter (horizontal pass, then vertical). */
    fun resizeBicubic(src: IntArray, w: Int, h: Int, outW: Int, outH: Int): IntArray {
        val hc = coeffs(w, outW)
        val vc = coeffs(h, outH)
        val needH = outW != w
        val needV = outH != h
        var img = src
        var iw = w
        var ih = h
        val vb = vc.bounds.copyOf()
        if (needH) {
            val first = vb[0]
            val last = vb[outH * 2 - 2] + vb[outH * 2 - 1]
            for (i in 0 until outH) vb[i * 2] -= first
            val rows = last - first
            val tmp = IntArray(outW * rows * 3)
            for (yy in 0 until rows) for (xx in 0 until outW) {
                val xmin = hc.bounds[xx * 2]
                val xmax = hc.bounds[xx * 2 + 1]
                for (c in 0 until 3) {
                    var ss = 1 shl (PRECISION_BITS - 1)
                    for (x in 0 until xmax) ss += src[((yy + first) * w + x + xmin) * 3 + c] * hc.kk[xx * hc.ksize + x]
                    tmp[(yy * outW + xx) * 3 + c] = clip8(ss)
                }
            }
            img = tmp
            iw = outW
            ih = rows
        }
        if (!needV) return img
        val out = IntArray(iw * outH * 3)
        for (yy in 0 until outH) {
            val ymin = if (needH) vb[yy * 2] else vc.bounds[yy * 2]
            val ymax = vc.bounds[yy * 2 + 1]
            for (xx in 0 until iw) for (c in 0 until 3) {
                var ss = 1 shl (PRECISION_BITS - 1)
                for (y in 0 until ymax) ss += img[((y + ymin) * iw + xx) * 3 + c] * vc.kk[yy * vc.ksize + y]
                out[(yy * iw + xx) * 3 + c] = clip8(ss)
            }
        }
        check(ih > 0)
        return out
    }
}
