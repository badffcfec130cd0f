package ai.autoglm.demo.core

/**
 * One user turn, ready for the assistant's answer:
 * `[gMASK]<sop><|user|>\n` + image / audio / text parts in the chosen order + `<|assistant|>\n`.
 * Every token carries its modality because M-RoPE positions and the embedding scatter need it.
 */
class ChatPrompt(val ids: IntArray, val types: IntArray) {
    val size: Int get() = ids.size

    companion object {
        const val TEXT = 0
        const val IMAGE = 1
        const val AUDIO = 3
        val DEFAULT_ORDER = listOf("image", "audio", "text")

        fun build(
            tokenizer: ByteLevelBpe,
            prompt: PromptConfig,
            text: String,
            imageTokens: Int,
            audioTokens: Int,
            order: List<String> = DEFAULT_ORDER
        ): ChatPrompt {
            val ids = ArrayList<Int>()
            val types = ArrayList<Int>()
            fun add(xs: IntArray, kind: Int) {
                for (x in xs) {
                    ids.add(x)
                    types.add(kind)
                }
            }
            val layout = PromptLayout.builtin(tokenizer, prompt)  // GLM-4.1V's layout around one user message
            val (before, after) = layout.roles.getValue("user")
            add(layout.prefix + before, TEXT)
            for (part in order) {
                require(part == "image" || part == "audio" || part == "text") { "unknown prompt part '$part' (use image, audio, text)" }
                val n = if (part == "image") imageTokens else if (part == "audio") audioTokens else 0
                if (part == "text") {
                    add(tokenizer.encode(text), TEXT)
                } else if (n > 0) {
                    val pieces = layout.media[part] ?: throw BundleError(BundleManifest.MANIFEST, "prompt.special_ids.$part",
                        "the id of the chat token '$part'", "nothing", "re-export the bundle with autoglm-export")
                    add(pieces.before, TEXT)
                    add(IntArray(n) { pieces.placeholder }, if (part == "image") IMAGE else AUDIO)
                    add(pieces.after, TEXT)
                }
            }
            add(after + layout.generation(null), TEXT)
            return ChatPrompt(ids.toIntArray(), types.toIntArray())
        }
    }
}
