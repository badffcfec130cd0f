package ai.autoglm.demo.core

/**
 * 3-axis M-RoPE positions (transformers' `Glm4vModel.get_rope_index`). Text and audio tokens get
 * the same position on t/h/w; an image whose merged grid is gh x gw starting at `cur` gets
 * t = cur, h = cur + row, w = cur + col, and the next token starts at cur + max(gh, gw).
 * Decode positions are cache_index + delta, delta = max(position) + 1 - prompt length.
 */
class MRopePositions(val positions: LongArray, val length: Int, val delta: Long) {
    /** Axis-major [3, length] slice [from, to) as a row-major [3, to - from] array. */
    fun slice(from: Int, to: Int): LongArray {
        val n = to - from
        val out = LongArray(3 * n)
        for (axis in 0 until 3) System.arraycopy(positions, axis * length + from, out, axis * n, n)
        return out
    }

    companion object {
        fun compute(types: IntArray, imageGrids: List<IntArray>): MRopePositions {
            val n = types.size
            val pos = LongArray(3 * n)
            var cur = 0L
            var i = 0
            var image = 0
            while (i < n) {
                val kind = types[i]
                var j = i
                while (j < n && types[j] == kind) j++
                val run = j - i
                when (kind) {
                    ChatPrompt.IMAGE -> {
                        if (image >= imageGrids.size) throw IllegalArgumentException("more image runs than image grids")
                        val gh = imageGrids[image][0]
                        val gw = imageGrids[image][1]
                        image++
                        if (gh * gw != run) throw IllegalArgumentException("image run of $run tokens does not match its grid ${gh}x$gw")
                        for (k in 0 until run) {
                            pos[i + k] = cur
                            pos[n + i + k] = cur + k / gw
                            pos[2 * n + i + k] = cur + k % gw
                        }
                        cur += Math.max(gh, gw).toLong()
                    }
                    ChatPrompt.TEXT, ChatPrompt.AUDIO -> {
                        for (k in 0 until run) {
                            for (axis in 0 until 3) pos[axis * n + i + k] = cur + k
                        }
                        cur += run.toLong()
                    }
                    else -> throw IllegalArgumentException("unknown token modality $kind")
                }
                i = j
            }
            var max = -1L
            for (p in pos) if (p > max) max = p
            val delta = if (n == 0) 0L else max + 1 - n
            return MRopePositions(pos, n, delta)
        }

        fun decode(cacheIndex: Int, delta: Long): LongArray {
            val p = cacheIndex + delta
            return longArrayOf(p, p, p)
        }
    }
}
