package ai.autoglm.demo.core

/**
 * The bundle's methods as the app calls them. The Android app implements it with ExecuTorch's
 * `Module.execute`; the tests implement it with a call-by-call recording of the host runner.
 */
interface ModelRuntime {
    val maxContext: Int
    val prefillChunk: Int

    /** [1, T] token ids -> [1, T, H] embeddings. */
    fun tokenEmbedding(inputIds: LongTensor): FloatTensor

    /** [N, C * P * P] pixels -> [image tokens, H], through the image bucket's vision [method]. */
    fun visionEncoder(pixelValues: FloatTensor, method: String): FloatTensor

    /** [1, mel bins, frames] log-mel -> [audio tokens, H]. */
    fun audioEncoder(inputFeatures: FloatTensor): FloatTensor

    /** [1, T, H] embeddings, [3, T] positions, [T] cache slots -> [1, V] logits of the last token. */
    fun textDecoder(inputsEmbeds: FloatTensor, positionIds: LongTensor, cachePosition: LongTensor): FloatTensor

    /** Forget the KV cache before a new conversation. */
    fun reset()
}

/** Per-token callback; return false to stop generating. */
interface TokenListener {
    fun onToken(token: Int): Boolean
}

class GenerationResult(val tokens: IntArray, val promptLength: Int, val ropeDelta: Long)

/**
 * The generation loop every runtime shares (a port of the exporter's host loop): embed the prompt
 * in chunks, write encoder outputs over their placeholder tokens, prefill in chunks with 3-axis
 * positions, then greedy decode one token at a time.
 */
class Generator(private val runtime: ModelRuntime, private val hiddenSize: Int) {

    fun generate(
        prompt: ChatPrompt,
        images: List<FloatTensor>,
        imageGrids: List<IntArray>,
        audios: List<FloatTensor>,
        maxNewTokens: Int,
        eosIds: IntArray,
        listener: TokenListener? = null,
        imageMethods: List<String> = emptyList()
    ): GenerationResult {
        val n = prompt.size
        if (n + maxNewTokens > runtime.maxContext) {
            throw IllegalArgumentException("prompt ($n tokens) + $maxNewTokens new tokens exceed the bundle's context of ${runtime.maxContext}")
        }
        val positions = MRopePositions.compute(prompt.types, imageGrids)
        runtime.reset()
        val h = hiddenSize
        val embeds = FloatArray(n * h)
        var a = 0
        while (a < n) {
            val b = Math.min(a + runtime.prefillChunk, n)
            val ids = LongArray(b - a) { prompt.ids[a + it].toLong() }
            val e = runtime.tokenEmbedding(LongTensor(intArrayOf(1, b - a), ids))
            System.arraycopy(e.data, 0, embeds, a * h, (b - a) * h)
            a = b
        }
        scatter(embeds, prompt, ChatPrompt.IMAGE, images) { i, x ->
            runtime.visionEncoder(x, imageMethods.getOrElse(i) { BundleManifest.COMPONENT_VISION })
        }
        scatter(embeds, prompt, ChatPrompt.AUDIO, audios) { _, x -> runtime.audioEncoder(x) }
        var logits: FloatTensor? = null
        a = 0
        while (a < n) {
            val b = Math.min(a + runtime.prefillChunk, n)
            val t = b - a
            val chunk = FloatArray(t * h)
            System.arraycopy(embeds, a * h, chunk, 0, t * h)
            val cache = LongArray(t) { (a + it).toLong() }
            logits = runtime.textDecoder(FloatTensor(intArrayOf(1, t, h), chunk),
                LongTensor(intArrayOf(3, t), positions.slice(a, b)), LongTensor(intArrayOf(t), cache))
            a = b
        }
        val tokens = ArrayList<Int>()
        var cacheIndex = n
        for (step in 0 until maxNewTokens) {
            val token = argmax(logits!!.data)
            tokens.add(token)
            val keepGoing = listener?.onToken(token) ?: true
            if (eosIds.contains(token) || !keepGoing || step == maxNewTokens - 1) break
            val e = runtime.tokenEmbedding(LongTensor(intArrayOf(1, 1), longArrayOf(token.toLong())))
            logits = runtime.textDecoder(FloatTensor(intArrayOf(1, 1, h), e.data),
                LongTensor(intArrayOf(3, 1), MRopePositions.decode(cacheIndex, positions.delta)),
                LongTensor(intArrayOf(1), longArrayOf(cacheIndex.toLong())))
            cacheIndex++
        }
        return GenerationResult(tokens.toIntArray(), n, positions.delta)
    }

    private fun scatter(embeds: FloatArray, prompt: ChatPrompt, kind: Int, inputs: List<FloatTensor>,
                        encode: (Int, FloatTensor) -> FloatTensor) {
        if (inputs.isEmpty()) return
        val slots = ArrayList<Int>()
        for (i in prompt.types.indices) if (prompt.types[i] == kind) slots.add(i)
        var row = 0
        for ((i, x) in inputs.withIndex()) {
            val f = encode(i, x)
            val rows = f.data.size / hiddenSize
            if (row + rows > slots.size) throw IllegalStateException("encoder outputs exceed the ${slots.size} placeholder tokens")
            for (r in 0 until rows) System.arraycopy(f.data, r * hiddenSize, embeds, slots[row + r] * hiddenSize, hiddenSize)
            row += rows
        }
        if (row != slots.size) throw IllegalStateException("$row encoder outputs for ${slots.size} placeholder tokens")
    }

    companion object {
        /** First index of the largest value, as torch.argmax. */
        fun argmax(x: FloatArray): Int {
            var best = 0
            for (i in 1 until x.size) if (x[i] > x[best]) best = i
            return best
        }
    }
}
