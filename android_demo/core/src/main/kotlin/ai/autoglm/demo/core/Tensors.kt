package ai.autoglm.demo.core

/** A float tensor as the runtime sees it: row-major data and its shape. */
class FloatTensor(val shape: IntArray, val data: FloatArray) {
    init {
        require(numel(shape) == data.size) { "shape ${shape.joinToString("x")} does not hold ${data.size} values" }
    }
}

/** An int64 tensor (token ids, positions). */
class LongTensor(val shape: IntArray, val data: LongArray) {
    init {
        require(numel(shape) == data.size) { "shape ${shape.joinToString("x")} does not hold ${data.size} values" }
    }
}

internal fun numel(shape: IntArray): Int {
    var n = 1
    for (d in shape) n *= d
    return n
}
