package ai.autoglm.demo.core

/**
 * OpenAI's additive penalties over the tokens of the answer so far (the agent asks for
 * `temperature=0, frequency_penalty=0.2`; [Sampling] applies them first): `frequency` times a token's
 * count plus `presence` once it has appeared, subtracted from its logit in float32 as the host does.
 */
class Penalties(val frequency: Float = 0f, val presence: Float = 0f) {
    /** [logits] with the penalties subtracted (the array itself when there is nothing to subtract). */
    fun apply(logits: FloatArray, answer: List<Int>): FloatArray {
        if (answer.isEmpty() || (frequency == 0f && presence == 0f)) return logits
        val x = logits.copyOf()
        val counts = LinkedHashMap<Int, Int>()
        for (t in answer) counts[t] = (counts[t] ?: 0) + 1
        for ((t, c) in counts) x[t] = x[t] - (c.toFloat() * frequency + presence)
        return x
    }
}

/**
 * One answer: its tokens (without the end-of-turn token), its text (cut before a stop string that
 * ended it), why it ended (`stop`: end-of-turn token or stop string, `length`: maxTokens or the
 * context, `cancelled`: the listener stopped it), and the prompt's reuse.
 */
class ChatTurn(val tokens: IntArray, val text: String, val finishReason: String, val promptTokens: Int, val reusedTokens: Int) {
    /** GLM's `<think>R</think>A` split into (R, A); no think block: ("", text). */
    val reasoningAndAnswer: Pair<String, String> get() = Reasoning.split(text)
}

/**
 * A conversation on one runtime, remembering what its KV cache holds (a port of the exporter's
 * ChatEngine): a turn whose prompt starts with tokens already in the cache, the same images
 * included, prefills only the rest, so the agent's step N prefills its new screen and task, not the
 * whole history again.
 */
class ChatSession(private val runtime: ModelRuntime, private val manifest: BundleManifest, private val tokenizer: ByteLevelBpe) {
    private var cached: List<Pair<Int, String>> = emptyList()
    private val generator = Generator(runtime, manifest.hiddenSize)

    /**
     * Answer [messages]. [stop]: strings that end the answer (cut before them, as OpenAI's `stop`);
     * [onText] receives the answer's text as it grows, never a piece a stop string or a half
     * multi-byte character may still take back; [listener] sees every token and may stop early.
     */
    fun chat(messages: List<Message>, maxTokens: Int, sampling: Sampling = Sampling(), enableThinking: Boolean? = null,
             listener: TokenListener? = null, stop: List<String> = emptyList(), onText: ((String) -> Unit)? = null): ChatTurn {
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
        val text = AnswerText(tokenizer, stop.filter { it.isNotEmpty() }, onText)
        var cancelled = false
        val watcher = object : TokenListener {
            override fun onToken(token: Int): Boolean {
                val keepGoing = listener?.onToken(token) ?: true
                cancelled = !keepGoing
                if (eos.contains(token)) return keepGoing
                return text.add(token) && keepGoing
            }
        }
        val result = generator.generate(r.prompt, r.images.map { it.pixels }, r.images.map { it.grid }, r.audios,
            Math.min(maxTokens, runtime.maxContext - n), eos, watcher, r.images.map { it.method }, reuse,
            { logits, answer -> sampling.choose(logits, answer) })
        val fed = result.tokens.copyOfRange(0, result.cached - n)
        cached = r.keys + fed.map { Pair(it, "") }
        val last = result.tokens.lastOrNull()
        val ended = last != null && eos.contains(last)
        val answer = if (ended) result.tokens.copyOfRange(0, result.tokens.size - 1) else result.tokens
        val reason = if (ended || text.stopped) "stop" else if (cancelled) "cancelled" else "length"
        return ChatTurn(answer, text.finish(), reason, n, reuse)
    }
}

/**
 * The text of a growing answer (the host's Detokenizer): the tokens since the last whole character
 * are decoded together, so a multi-byte character split over tokens comes out whole without
 * decoding the whole answer again per token; a stop string cuts the text where it begins and ends
 * the answer.
 */
internal class AnswerText(private val tokenizer: ByteLevelBpe, private val stops: List<String>, private val onText: ((String) -> Unit)?) {
    private val window = ArrayList<Int>()  // the tokens after the committed text
    private var committed = ""
    private var text = ""
    private var shown = ""
    var stopped = false
        private set

    /** Adds [token]; false once a stop string has appeared. */
    fun add(token: Int): Boolean {
        window.add(token)
        val tail = tokenizer.decode(window.toIntArray())
        val seen = text.length
        var t = committed + tail
        if (!tail.endsWith("\uFFFD")) {  // ends on a whole character: later tokens decode on their own
            committed = t
            window.clear()
        }
        for (s in stops) {  // only where the new text can complete a stop string
            val at = t.indexOf(s, Math.max(0, seen - s.length + 1))
            if (at >= 0) {
                t = t.substring(0, at)
                stopped = true
            }
        }
        text = t
        val ready = if (stopped) t else holdBack(t.trimEnd('\uFFFD'), stops)
        show(ready)
        return !stopped
    }

    /** The final text; a character the answer ended inside stays U+FFFD, as a full decode shows it. */
    fun finish(): String {
        show(text)
        return text
    }

    private fun show(ready: String) {
        if (onText != null && ready.length > shown.length && ready.startsWith(shown)) {
            onText.invoke(ready.substring(shown.length))
            shown = ready
        }
    }

    companion object {
        /** [text] without a tail that could still grow into one of [stops]. */
        fun holdBack(text: String, stops: List<String>): String {
            var cut = 0
            for (s in stops) {
                for (k in Math.min(s.length - 1, text.length) downTo 1) {
                    if (text.endsWith(s.substring(0, k))) {
                        cut = Math.max(cut, k)
                        break
                    }
                }
            }
            return text.substring(0, text.length - cut)
        }
    }
}

/** GLM's reasoning block (the exporter's host/conversation.split_reasoning). */
object Reasoning {
    const val OPEN = "<think>"
    const val CLOSE = "</think>"

    /** (reasoning, answer) of `<think>R</think>A`; no think block: ("", text); unclosed: (R, ""). */
    fun split(text: String): Pair<String, String> {
        val stripped = text.trimStart()
        if (!stripped.startsWith(OPEN)) return Pair("", text)
        val body = stripped.substring(OPEN.length)
        val end = body.indexOf(CLOSE)
        if (end < 0) return Pair(body, "")
        return Pair(body.substring(0, end), body.substring(end + CLOSE.length))
    }
}
