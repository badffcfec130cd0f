package ai.autoglm.demo.core

/**
 * The checkpoint's chat template as token pieces (manifest `prompt.layout`; a port of the
 * exporter's host.prompt_layout): the app has no template engine, so the exporter renders the
 * template on probe conversations, cuts it into these pieces and checks that they give the
 * template's tokens. A conversation is `prefix`, then per message its role's `before`, its parts
 * (text encoded on its own; an image or clip as its kind's `before`, one `placeholder` per token,
 * `after`) and its role's `after`, then the generation prompt for the thinking switch.
 */
class PromptLayout(
    val prefix: IntArray,
    val roles: Map<String, Pair<IntArray, IntArray>>,
    val media: Map<String, MediaPieces>,
    private val generation: Map<String, IntArray>
) {
    class MediaPieces(val before: IntArray, val placeholder: Int, val after: IntArray)

    /** The generation prompt: `default` when the request says nothing about thinking. */
    fun generation(enableThinking: Boolean?): IntArray =
        generation.getValue(when (enableThinking) { null -> "default"; true -> "on"; false -> "off" })

    companion object {
        fun parse(node: JsonNode): PromptLayout {
            val rolesNode = node.reqObj("roles")
            val roles = rolesNode.keys().filter { it in Message.ROLES }.associateWith { role ->  // <|system|> is optional
                val r = rolesNode.child(role, rolesNode.req(role))
                Pair(r.reqInts("before"), r.reqInts("after"))
            }
            val mediaNode = node.reqObj("media")
            val media = LinkedHashMap<String, MediaPieces>()
            for (kind in listOf(Part.IMAGE, Part.AUDIO)) {
                val m = mediaNode.opt(kind) ?: continue
                val n = mediaNode.child(kind, m)
                media[kind] = MediaPieces(n.reqInts("before"), n.reqInt("placeholder"), n.reqInts("after"))
            }
            val g = node.reqObj("generation")
            return PromptLayout(node.reqInts("prefix"), roles, media,
                mapOf("default" to g.reqInts("default"), "on" to g.reqInts("on"), "off" to g.reqInts("off")))
        }

        /** GLM-4.1V's layout, for bundles written before `prompt.layout` existed. */
        fun builtin(tokenizer: ByteLevelBpe, prompt: PromptConfig): PromptLayout {
            fun sp(name: String) = prompt.special(name, BundleManifest.MANIFEST)
            val newline = tokenizer.encode("\n")
            val roles = Message.ROLES.filter { it in prompt.specialIds }.associateWith { Pair(intArrayOf(sp(it)) + newline, IntArray(0)) }
            val media = LinkedHashMap<String, MediaPieces>()
            media[Part.IMAGE] = MediaPieces(intArrayOf(sp("begin_of_image")), sp("image"), intArrayOf(sp("end_of_image")))
            if ("audio" in prompt.specialIds) {
                media[Part.AUDIO] = MediaPieces(intArrayOf(sp("begin_of_audio")), sp("audio"), intArrayOf(sp("end_of_audio")))
            }
            val generation = intArrayOf(sp("assistant")) + newline
            return PromptLayout(intArrayOf(sp("gmask"), sp("sop")), roles, media,
                mapOf("default" to generation, "on" to generation, "off" to generation + tokenizer.encode("<think></think>")))
        }
    }
}
