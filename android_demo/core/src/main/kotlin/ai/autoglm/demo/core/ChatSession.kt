package ai.autoglm.demo.core

/**
 * OpenAI's additive penalties over the tokens of the answer so far, then the largest logit (what
 * the agent's `temperature=0, frequency_penalty=0.2` asks for): `frequency` times a token's count
 * plus `presence` once it has appeared, subtracted from its logit in float32 as the host does.
 */
class Penalties(val frequency: Float = 0f, val presence: Float = 0f) {
    fun choose(logits: FloatArray, answer: List<Int>): Int {
        if (answer.isEmpty() || (frequency == 0f && presence == 0f)) return Generator.argmax(logits)
        val x = logits.copyOf()
        val counts = LinkedHashMap<Int, Int>()
        for (t in answer) counts[t] = (counts[t] ?: 0) + 1
        for ((t, c) in counts) x[t] = x[t] - (c.toFloat() * frequency + presence)
        return Generator.argmax(x)
    }
}

/** One answer: its tokens (without the end-of-turn token), why it ended, and the prompt's reuse. */
class ChatTurn(val tokens: IntArray, val finishReason: String, val promptTokens: Int, val reusedTokens: Int)

/**
 * A conversation on one runtime, remembering what its KV cache holds (a port of the exporter's
 * ChatEngine): a turn whose prompt starts with tokens already in the cache, the same images
 * included, prefills only the rest, so the agent's step N prefills its new screen and task, not the
 * whole history again.
 */
class ChatSession(private val runtime: ModelRuntime, private val manifest: BundleManifest, private val tokenizer: ByteLevelBpe) {
    private var cached: List<Pair<Int, String>> = emptyList()
    private val generator = Generator(runtime, manifest.hiddenSize)

    fun chat(messages: List<Message>, maxTokens: Int, penalties: Penalties = Penalties(), enableThinking: Boolean? = null,
             listener: TokenListener? = null): ChatTurn {
        val r = Conversation.render(tokenizer, manifest.prompt, messages, manifest.audioTokens, enableThinking)
        val n = r.prompt.size
        require(n < runtime.maxContext) {
            "the prompt ($n tokens) does not fit the bundle's context of ${runtime.maxContext}: drop earlier turns or images"
        }
        require(maxTokens >= 1) { "maxTokens must be at least 1" }
        var reuse = 0
        val limit = Math.min(cached.size, n - 1)  // the prompt's last token always runs: its logits start the answer
        while (reuse < limit && cached[reuse] == r.keys[reuse]) reuse++
        cached = emptyList()  // until this turn completes the cache holds an unknown mix
        val eos = manifest.prompt.eosIds
        val result = generator.generate(r.prompt, r.images.map { it.pixels }, r.images.map { it.grid }, r.audios,
            Math.min(maxTokens, runtime.maxContext - n), eos, listener, r.images.map { it.method }, reuse,
            { logits, answer -> penalties.choose(logits, answer) })
        val fed = result.tokens.copyOfRange(0, result.cached - n)
        cached = r.keys + fed.map { Pair(it, "") }
        val last = result.tokens.lastOrNull()
        val stopped = last != null && eos.contains(last)
        val answer = if (stopped) result.tokens.copyOfRange(0, result.tokens.size - 1) else result.tokens
        return ChatTurn(answer, if (stopped) "stop" else "length", n, reuse)
    }
}
