package ai.autoglm.demo.core

/**
 * The next token from logits, with OpenAI's and Hugging Face's knobs (a port of the exporter's
 * host/sampling.py): [penalties] first, then greedy when [temperature] is 0 or [topK] is 1;
 * otherwise temperature, top-k, top-p (the smallest head of the sorted distribution whose mass
 * reaches [topP]; the first token always stays), softmax and one draw. A [seed] makes the draws
 * repeatable; without one each session draws its own. The draws are not the host's (torch's
 * generator is not ported): sampled answers match the host in distribution, greedy ones token for
 * token.
 */
class Sampling(
    val temperature: Float = 0f,
    val topP: Float = 1f,
    val topK: Int = 0,
    val penalties: Penalties = Penalties(),
    seed: Long? = null
) {
    init {
        require(temperature >= 0f && temperature.isFinite()) { "temperature must be 0 or more, got $temperature" }
        require(topP > 0f && topP <= 1f) { "topP must lie in (0, 1], got $topP" }
        require(topK >= 0) { "topK must be 0 (no cut) or more, got $topK" }
    }

    private val random = if (seed != null) java.util.Random(seed) else java.util.Random()

    val greedy: Boolean get() = temperature == 0f || topK == 1

    fun choose(logits: FloatArray, answer: List<Int>): Int {
        val x = penalties.apply(logits, answer)
        if (greedy) return Generator.argmax(x)
        val order = x.indices.sortedWith(compareByDescending<Int> { x[it] }.thenBy { it })
        var keep = if (topK in 1 until order.size) topK else order.size
        val top = x[order[0]] / temperature
        val p = DoubleArray(keep) { Math.exp((x[order[it]] / temperature - top).toDouble()) }
        var sum = p.sum()
        if (topP < 1f) {
            var mass = 0.0
            for (i in 0 until keep) {
                if (mass / sum >= topP) {
                    keep = i
                    break
                }
                mass += p[i]
            }
            sum = 0.0
            for (i in 0 until keep) sum += p[i]
        }
        var u = random.nextDouble() * sum
        for (i in 0 until keep) {
            u -= p[i]
            if (u < 0) return order[i]
        }
        return order[keep - 1]
    }
}
