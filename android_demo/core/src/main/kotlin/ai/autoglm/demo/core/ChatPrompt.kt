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
            fun sp(name: String) = intArrayOf(prompt.special(name, BundleManifest.MANIFEST))
            add(intArrayOf(prompt.special("gmask", BundleManifest.MANIFEST), prompt.special("sop", BundleManifest.MANIFEST),
                prompt.special("user", BundleManifest.MANIFEST)), TEXT)
            add(tokenizer.encode("\n"), TEXT)
            for (part in order) {
                if (part == "image" && imageTokens > 0) {
                    add(sp("begin_of_image"), TEXT)
                    add(IntArray(imageTokens) { prompt.special("image", BundleManifest.MANIFEST) }, IMAGE)
                    add(sp("end_of_image"), TEXT)
                } else if (part == "audio" && audioTokens > 0) {
                    add(sp("begin_of_audio"), TEXT)
                    add(IntArray(audioTokens) { prompt.special("audio", BundleManifest.MANIFEST) }, AUDIO)
                    add(sp("end_of_audio"), TEXT)
                } else if (part == "text") {
                    add(tokenizer.encode(text), TEXT)
                } else if (part != "image" && part != "audio") {
                    throw IllegalArgumentException("unknown prompt part '$part' (use image, audio, text)")
                }
            }
            add(sp("assistant"), TEXT)
            add(tokenizer.encode("\n"), TEXT)
            return ChatPrompt(ids.toIntArray(), types.toIntArray())
        }
    }
}
