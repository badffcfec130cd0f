package ai.autoglm.demo.core

import java.nio.ByteBuffer
import java.security.MessageDigest

/** One piece of a message: text, an image ready for its bucket's vision method, or a log-mel clip. */
class Part private constructor(val kind: String, val text: String, val image: ImageInput?, val audio: FloatTensor?) {
    /** What the cache remembers of this part's placeholder tokens: the same pixels give the same key. */
    val key: String by lazy {
        when (kind) {
            IMAGE -> digest(image!!.pixels)
            AUDIO -> digest(audio!!)
            else -> ""
        }
    }

    /** Placeholder tokens of this part: an image's merged grid, a clip's encoder rows. */
    fun tokens(audioTokens: Int?): Int = when (kind) {
        IMAGE -> image!!.tokens
        AUDIO -> audioTokens ?: throw IllegalArgumentException("this bundle has no audio encoder: send no audio")
        else -> 0
    }

    companion object {
        const val TEXT = "text"
        const val IMAGE = "image"
        const val AUDIO = "audio"

        fun text(text: String) = Part(TEXT, text, null, null)
        fun image(image: ImageInput) = Part(IMAGE, "", image, null)
        fun audio(logMel: FloatTensor) = Part(AUDIO, "", null, logMel)

        private fun digest(t: FloatTensor): String {
            val md = MessageDigest.getInstance("SHA-256")
            val buf = ByteBuffer.allocate(4 * (t.shape.size + t.data.size))
            for (d in t.shape) buf.putInt(d)
            for (v in t.data) buf.putFloat(v)
            return md.digest(buf.array()).joinToString("") { String.format("%02x", it) }.substring(0, 32)
        }
    }
}

class Message(val role: String, val parts: List<Part>) {
    companion object {
        val ROLES = listOf("system", "user", "assistant")
        fun text(role: String, text: String) = Message(role, listOf(Part.text(text)))
    }
}

/**
 * A conversation rendered for the model: the prompt (ids and types), the key of every token for
 * prefix reuse (its id, plus the digest of the image or clip it stands for), and the media in order.
 */
class RenderedConversation(val prompt: ChatPrompt, val keys: List<Pair<Int, String>>, val images: List<ImageInput>,
                           val audios: List<FloatTensor>)

/**
 * Multi-turn conversations rendered for the model (a port of the exporter's host.conversation): the
 * bundle's chat layout (`prompt.layout`: the checkpoint's template as token pieces, checked against it
 * at export) fills in the role, image, audio and generation tokens around the messages' parts. For
 * GLM-4.1V: `[gMASK]<sop>`, each message as its role token, a newline and its parts (an image as
 * `<|begin_of_image|>` + one `<|image|>` per token of its bucket + `<|end_of_image|>`), then
 * `<|assistant|>\n`.
 */
object Conversation {
    fun render(tokenizer: ByteLevelBpe, prompt: PromptConfig, messages: List<Message>, audioTokens: Int?,
               enableThinking: Boolean? = null): RenderedConversation {
        check(messages)
        val layout = prompt.chatLayout(tokenizer)
        val ids = ArrayList<Int>()
        val types = ArrayList<Int>()
        val keys = ArrayList<Pair<Int, String>>()
        val images = ArrayList<ImageInput>()
        val audios = ArrayList<FloatTensor>()
        fun add(xs: IntArray, kind: Int = ChatPrompt.TEXT, key: String = "") {
            for (x in xs) {
                ids.add(x)
                types.add(kind)
                keys.add(Pair(x, key))
            }
        }
        add(layout.prefix)
        for (m in messages) {
            val (before, after) = layout.roles[m.role]
                ?: throw IllegalArgumentException("this bundle's chat layout has no ${m.role} turns: send none")
            add(before)
            for (part in m.parts) {
                if (part.kind == Part.TEXT) {
                    add(tokenizer.encode(part.text))
                    continue
                }
                val n = part.tokens(audioTokens)
                val pieces = layout.media[part.kind]
                    ?: throw IllegalArgumentException("this bundle's chat layout has no place for ${part.kind}: send no ${part.kind}")
                add(pieces.before)
                add(IntArray(n) { pieces.placeholder }, if (part.kind == Part.IMAGE) ChatPrompt.IMAGE else ChatPrompt.AUDIO, part.key)
                add(pieces.after)
                if (part.kind == Part.IMAGE) images.add(part.image!!) else audios.add(part.audio!!)
            }
            add(after)
        }
        add(layout.generation(enableThinking))
        return RenderedConversation(ChatPrompt(ids.toIntArray(), types.toIntArray()), keys, images, audios)
    }

    fun check(messages: List<Message>) {
        require(messages.isNotEmpty()) { "empty conversation: send at least one user message" }
        require(messages.last().role != "assistant") { "the last message is the assistant's: end with the user's turn" }
        for ((i, m) in messages.withIndex()) {
            require(m.role in Message.ROLES) { "messages[$i].role '${m.role.take(40)}': use system, user or assistant" }
            require(m.role == "user" || m.parts.all { it.kind == Part.TEXT }) {
                "messages[$i]: only user turns carry images or audio"
            }
        }
    }
}
