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

/** [cached]: the cache slots holding this call's tokens when it returned (the prompt and the tokens fed back). */
class GenerationResult(val tokens: IntArray, val promptLength: Int, val ropeDelta: Long, val cached: Int)

/**
 * The generation loop every runtime shares (a port of the exporter's host loop): embed the prompt
 * in chunks, write encoder outputs over their placeholder tokens, prefill in chunks with 3-axis
 * positions, then decode one token at a time: greedy, or [choose] (logits, answer so far).
 * [reuse]: how many of the prompt's first tokens the cache already holds from the previous call
 * with the same tokens and media (prefix reuse); those are neither embedded, encoded nor prefilled
 * again, and 0 starts afresh.
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
        imageMethods: List<String> = emptyList(),
        reuse: Int = 0,
        choose: ((FloatArray, List<Int>) -> Int)? = null
    ): GenerationResult {
        val n = prompt.size
        if (n + maxNewTokens > runtime.maxContext) {
            throw IllegalArgumentException("prompt ($n tokens) + $maxNewTokens new tokens exceed the bundle's context of ${runtime.maxContext}")
        }
        require(reuse in 0 until n) { "reuse $reuse outside [0, $n): at least the prompt's last token must run" }
        val positions = MRopePositions.compute(prompt.types, imageGrids)
        if (reuse == 0) runtime.reset()
        val h = hiddenSize
        val embeds = FloatArray((n - reuse) * h)  // the prompt's tokens from reuse on
        var a = reuse
        while (a < n) {
            val b = Math.min(a + runtime.prefillChunk, n)
            val ids = LongArray(b - a) { prompt.ids[a + it].toLong() }
            val e = runtime.tokenEmbedding(LongTensor(intArrayOf(1, b - a), ids))
            System.arraycopy(e.data, 0, embeds, (a - reuse) * h, (b - a) * h)
            a = b
        }
        scatter(embeds, prompt, ChatPrompt.IMAGE, images, imageGrids.map { it[0] * it[1] }, reuse) { i, x ->
            runtime.visionEncoder(x, imageMethods.getOrElse(i) { BundleManifest.COMPONENT_VISION })
        }
        scatter(embeds, prompt, ChatPrompt.AUDIO, audios, null, reuse) { _, x -> runtime.audioEncoder(x) }
        var logits: FloatTensor? = null
        a = reuse
        while (a < n) {
            val b = Math.min(a + runtime.prefillChunk, n)
            val t = b - a
            val chunk = FloatArray(t * h)
            System.arraycopy(embeds, (a - reuse) * h, chunk, 0, t * h)
            val cache = LongArray(t) { (a + it).toLong() }
            logits = runtime.textDecoder(FloatTensor(intArrayOf(1, t, h), chunk),
                LongTensor(intArrayOf(3, t), positions.slice(a, b)), LongTensor(intArrayOf(t), cache))
            a = b
        }
        val tokens = ArrayList<Int>()
        var cacheIndex = n
        for (step in 0 until maxNewTokens) {
            val token = if (choose == null) argmax(logits!!.data) else choose(logits!!.data, tokens)
            tokens.add(token)
            val keepGoing = listener?.onToken(token) ?: true
            if (eosIds.contains(token) || !keepGoing || step == maxNewTokens - 1) break
            val e = runtime.tokenEmbedding(LongTensor(intArrayOf(1, 1), longArrayOf(token.toLong())))
            logits = runtime.textDecoder(FloatTensor(intArrayOf(1, 1, h), e.data),
                LongTensor(intArrayOf(3, 1), MRopePositions.decode(cacheIndex, positions.delta)),
                LongTensor(intArrayOf(1), longArrayOf(cacheIndex.toLong())))
            cacheIndex++
        }
        return GenerationResult(tokens.toIntArray(), n, positions.delta, cacheIndex)
    }

    /**
     * Encode each input and write its rows over its placeholder tokens: [lengths] of them each
     * (equal shares when null). [embeds] holds the prompt from [reuse] on: an input whose tokens all
     * lie before it is already in the cache and is not encoded again.
     */
    private fun scatter(embeds: FloatArray, prompt: ChatPrompt, kind: Int, inputs: List<FloatTensor>, lengths: List<Int>?,
                        reuse: Int, encode: (Int, FloatTensor) -> FloatTensor) {
        if (inputs.isEmpty()) return
        val slots = ArrayList<Int>()
        for (i in prompt.types.indices) if (prompt.types[i] == kind) slots.add(i)
        if (lengths == null && slots.size % inputs.size != 0) {
            throw IllegalStateException("${slots.size} placeholder tokens for ${inputs.size} inputs")
        }
        val per = lengths ?: List(inputs.size) { slots.size / inputs.size }
        if (per.size != inputs.size || per.sum() != slots.size) {
            throw IllegalStateException("${slots.size} placeholder tokens for inputs of $per tokens")
        }
        var start = 0
        for ((i, x) in inputs.withIndex()) {
            val own = slots.subList(start, start + per[i])
            start += per[i]
            if (own.last() < reuse) continue
            val f = encode(i, x)
            if (f.data.size != per[i] * hiddenSize) {
                throw IllegalStateException("${f.data.size / hiddenSize} encoder outputs for ${per[i]} placeholder tokens")
            }
            for ((r, slot) in own.withIndex()) {
                if (slot >= reuse) System.arraycopy(f.data, r * hiddenSize, embeds, (slot - reuse) * hiddenSize, hiddenSize)
            }
        }
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
