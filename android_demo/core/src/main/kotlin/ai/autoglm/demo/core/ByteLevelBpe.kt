package ai.autoglm.demo.core

import com.google.gson.JsonElement
import java.text.Normalizer
import java.util.regex.Pattern

/**
 * A byte-level BPE tokenizer read from Hugging Face `tokenizer.json` (the GLM-4 family's format):
 * added tokens matched first (leftmost, longest), then the pre-tokenizer (ByteLevel with the GPT-2
 * split, Split with a regex, or a Sequence of them), bytes mapped to printable characters, merges
 * applied by rank. Anything else in the file is refused with a one-line error rather than
 * tokenized differently from the exporter's host runner.
 */
class ByteLevelBpe private constructor(
    private val vocab: Map<String, Int>,
    private val idToToken: Map<Int, String>,
    private val ranks: Map<String, Int>,
    private val added: List<Pair<String, Int>>,
    private val specialIds: Set<Int>,
    private val splitters: List<Splitter>,
    private val nfc: Boolean
) {
    private class Splitter(val pattern: Pattern, val byteLevel: Boolean)

    fun encode(text: String): IntArray {
        val out = ArrayList<Int>()
        val normalized = if (nfc) Normalizer.normalize(text, Normalizer.Form.NFC) else text
        var start = 0
        var i = 0
        while (i < normalized.length) {
            val hit = addedAt(normalized, i)
            if (hit == null) {
                i++
                continue
            }
            encodeOrdinary(normalized.substring(start, i), out)
            out.add(hit.second)
            i += hit.first.length
            start = i
        }
        encodeOrdinary(normalized.substring(start), out)
        return out.toIntArray()
    }

    /** Token ids back to text; special tokens are skipped, invalid UTF-8 becomes U+FFFD. */
    fun decode(ids: IntArray): String {
        val bytes = java.io.ByteArrayOutputStream()
        for (id in ids) {
            if (specialIds.contains(id)) continue
            val tok = idToToken[id] ?: continue
            if (addedContent.contains(tok)) {
                val b = tok.toByteArray(Charsets.UTF_8)
                bytes.write(b, 0, b.size)
                continue
            }
            for (ch in tok) {
                val b = UNICODE_TO_BYTE[ch] ?: throw IllegalStateException("token $id is not byte-level: '$tok'")
                bytes.write(b)
            }
        }
        return String(bytes.toByteArray(), Charsets.UTF_8)
    }

    private val addedContent: Set<String> = added.map { it.first }.toSet()

    private fun addedAt(s: String, i: Int): Pair<String, Int>? {
        // added tokens are sorted longest first, so the first hit is the longest one. Special tokens
        // in user text are text (as encode_special_tokens in the host tokenizer): typing "<|user|>"
        // must not open a turn; the prompt builder inserts special ids itself.
        for (a in added) if (!specialIds.contains(a.second) && s.startsWith(a.first, i)) return a
        return null
    }

    private fun encodeOrdinary(text: String, out: MutableList<Int>) {
        if (text.isEmpty()) return
        var pieces = listOf(text)
        var mapped = false
        for (sp in splitters) {
            val next = ArrayList<String>()
            for (p in pieces) splitIsolated(p, sp.pattern, next)
            pieces = next
            if (sp.byteLevel) mapped = true
        }
        for (p in pieces) {
            val word = if (mapped) byteLevel(p) else p
            bpe(word, out)
        }
    }

    private fun bpe(word: String, out: MutableList<Int>) {
        val whole = vocab[word]
        val symbols = ArrayList<String>()
        var k = 0
        while (k < word.length) {
            val cp = word.codePointAt(k)
            val n = Character.charCount(cp)
            symbols.add(word.substring(k, k + n))
            k += n
        }
        while (symbols.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (j in 0 until symbols.size - 1) {
                val r = ranks[symbols[j] + SEP + symbols[j + 1]]
                if (r != null && r < bestRank) {
                    bestRank = r
                    best = j
                }
            }
            if (best < 0) break
            val left = symbols[best]
            val right = symbols[best + 1]
            // merge every occurrence of the best pair, left to right, without overlaps
            val merged = ArrayList<String>()
            var j = 0
            while (j < symbols.size) {
                if (j < symbols.size - 1 && symbols[j] == left && symbols[j + 1] == right) {
                    merged.add(left + right)
                    j += 2
                } else {
                    merged.add(symbols[j])
                    j++
                }
            }
            symbols.clear()
            symbols.addAll(merged)
        }
        if (symbols.size == 1 && whole != null) {
            out.add(whole)
            return
        }
        for (s in symbols) {
            out.add(vocab[s] ?: throw IllegalArgumentException("symbol '$s' is not in the vocabulary"))
        }
    }

    companion object {
        private const val SEP = "\u0000"
        private const val GPT2_SPLIT =
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

        /** GPT-2's reversible byte -> printable character table. */
        val BYTE_TO_UNICODE: CharArray = CharArray(256).also { table ->
            val direct = ArrayList<Int>()
            for (b in '!'.toInt()..'~'.toInt()) direct.add(b)
            for (b in 0xA1..0xAC) direct.add(b)
            for (b in 0xAE..0xFF) direct.add(b)
            var n = 0
            for (b in 0 until 256) {
                if (direct.contains(b)) {
                    table[b] = b.toChar()
                } else {
                    table[b] = (256 + n).toChar()
                    n++
                }
            }
        }
        private val UNICODE_TO_BYTE: Map<Char, Int> = HashMap<Char, Int>().also { m ->
            for (b in 0 until 256) m[BYTE_TO_UNICODE[b]] = b
        }

        fun byteLevel(s: String): String {
            val sb = StringBuilder()
            for (b in s.toByteArray(Charsets.UTF_8)) sb.append(BYTE_TO_UNICODE[b.toInt() and 0xFF])
            return sb.toString()
        }

        /** Split keeping both the matches and the text between them (HF's "Isolated" behaviour). */
        internal fun splitIsolated(s: String, p: Pattern, out: MutableList<String>) {
            val m = p.matcher(s)
            var last = 0
            while (m.find()) {
                if (m.start() > last) out.add(s.substring(last, m.start()))
                if (m.end() > m.start()) out.add(s.substring(m.start(), m.end()))
                last = m.end()
            }
            if (last < s.length) out.add(s.substring(last))
        }

        fun parse(text: String, file: String = "tokenizer.json"): ByteLevelBpe {
            val root = JsonNode.parse(file, text)
            val model = root.reqObj("model")
            val type = model.reqString("type")
            if (type != "BPE") throw BundleError(file, "model.type", "BPE", type, "use the tokenizer.json of a GLM-4 checkpoint")
            val vocabNode = model.reqObj("vocab")
            val vocab = HashMap<String, Int>()
            val idToToken = HashMap<Int, String>()
            for (k in vocabNode.keys()) {
                val id = vocabNode.reqInt(k)
                vocab[k] = id
                idToToken[id] = k
            }
            val ranks = HashMap<String, Int>()
            val merges = model.reqArray("merges")
            for (i in 0 until merges.size()) {
                val e = merges.get(i)
                val pair: List<String> = if (e.isJsonArray) listOf(e.asJsonArray.get(0).asString, e.asJsonArray.get(1).asString)
                else e.asString.split(" ", limit = 2)
                if (pair.size != 2) throw BundleError(file, "model.merges[$i]", "a pair", e.toString(), "use a valid tokenizer.json")
                ranks.putIfAbsent(pair[0] + SEP + pair[1], i)
            }
            val added = ArrayList<Pair<String, Int>>()
            val special = HashSet<Int>()
            val addedArr = root.opt("added_tokens")
            if (addedArr != null && addedArr.isJsonArray) {
                for (i in 0 until addedArr.asJsonArray.size()) {
                    val a = root.child("added_tokens[$i]", addedArr.asJsonArray.get(i))
                    val content = a.reqString("content")
                    val id = a.reqInt("id")
                    added.add(Pair(content, id))
                    idToToken[id] = content
                    val sp = a.opt("special")
                    if (sp != null && sp.asBoolean) special.add(id)
                }
            }
            added.sortWith(Comparator { x, y -> y.first.length - x.first.length })
            val splitters = ArrayList<Splitter>()
            val pre = root.opt("pre_tokenizer")
            if (pre != null) collectSplitters(root.child("pre_tokenizer", pre), file, splitters)
            val norm = root.opt("normalizer")
            var nfc = false
            if (norm != null) {
                val t = root.child("normalizer", norm).reqString("type")
                if (t == "NFC") nfc = true
                else throw BundleError(file, "normalizer.type", "none or NFC", t, "use the tokenizer.json of a GLM-4 checkpoint")
            }
            return ByteLevelBpe(vocab, idToToken, ranks, added, special, splitters, nfc)
        }

        private fun collectSplitters(node: JsonNode, file: String, out: MutableList<Splitter>) {
            val flags = Pattern.UNICODE_CHARACTER_CLASS
            when (val type = node.reqString("type")) {
                "Sequence" -> {
                    val arr = node.reqArray("pretokenizers")
                    for (i in 0 until arr.size()) collectSplitters(node.child("pretokenizers[$i]", arr.get(i)), file, out)
                }
                "ByteLevel" -> {
                    val prefix = node.opt("add_prefix_space")
                    if (prefix != null && prefix.asBoolean) {
                        throw BundleError(file, "${node.path}.add_prefix_space", "false", "true", "use the tokenizer.json of a GLM-4 checkpoint")
                    }
                    val useRegex = node.opt("use_regex")
                    val regex = useRegex == null || useRegex.asBoolean
                    // without its regex ByteLevel only maps bytes: a pattern that matches the whole piece
                    out.add(Splitter(Pattern.compile(if (regex) GPT2_SPLIT else "(?s).+", flags), true))
                }
                "Split" -> {
                    val behavior = node.reqString("behavior")
                    if (behavior != "Isolated") {
                        throw BundleError(file, "${node.path}.behavior", "Isolated", behavior, "use the tokenizer.json of a GLM-4 checkpoint")
                    }
                    val invert = node.opt("invert")
                    if (invert != null && invert.asBoolean) {
                        throw BundleError(file, "${node.path}.invert", "false", "true", "use the tokenizer.json of a GLM-4 checkpoint")
                    }
                    val pat = node.reqObj("pattern")
                    val p: JsonElement? = pat.opt("Regex")
                    val pattern = if (p != null) Pattern.compile(p.asString, flags) else Pattern.compile(Pattern.quote(pat.reqString("String")))
                    out.add(Splitter(pattern, false))
                }
                else -> throw BundleError(file, "${node.path}.type", "ByteLevel, Split or Sequence", type,
                    "use the tokenizer.json of a GLM-4 checkpoint")
            }
        }
    }
}
