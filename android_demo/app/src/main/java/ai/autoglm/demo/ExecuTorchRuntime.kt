package ai.autoglm.demo

import ai.autoglm.demo.core.BundleManifest
import ai.autoglm.demo.core.FloatTensor
import ai.autoglm.demo.core.GraphRunner
import ai.autoglm.demo.core.LongTensor
import ai.autoglm.demo.core.ModelRuntime
import ai.autoglm.demo.core.StaticGraphRuntime
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import java.io.File

/**
 * The bundle's methods through ExecuTorch's Android API. Which file and method serve each
 * component comes from the manifest; the KV cache lives inside the text_decoder method (or, for a
 * decoder lowered in parts, inside each part's method for its own layers; slots at
 * and after cache_position are masked), so a new conversation simply starts at slot 0 again.
 */
class ExecuTorchRuntime(private val dir: File, private val manifest: BundleManifest) : ModelRuntime {
    private val modules = HashMap<String, Module>()

    override val maxContext: Int get() = manifest.maxContext
    override val prefillChunk: Int get() = manifest.prefillChunk

    private fun module(file: String): Module = modules.getOrPut(file) {
        Module.load(File(dir, file).absolutePath, Module.LOAD_MODE_MMAP)
    }

    private fun call(component: String, vararg inputs: Tensor): FloatTensor {
        val spec = manifest.component(component)
        val values = inputs.map { EValue.from(it) }.toTypedArray()
        val out = module(spec.file).execute(spec.method, *values)[0].toTensor()
        return FloatTensor(out.shape().map { it.toInt() }.toIntArray(), out.dataAsFloatArray)
    }

    private fun IntArray.dims(): LongArray = LongArray(size) { this[it].toLong() }

    override fun tokenEmbedding(inputIds: LongTensor): FloatTensor =
        call(BundleManifest.COMPONENT_EMBEDDING, Tensor.fromBlob(inputIds.data, inputIds.shape.dims()))

    override fun visionEncoder(pixelValues: FloatTensor, method: String): FloatTensor =
        call(method, Tensor.fromBlob(pixelValues.data, pixelValues.shape.dims()))

    override fun audioEncoder(inputFeatures: FloatTensor): FloatTensor =
        call(BundleManifest.COMPONENT_AUDIO, Tensor.fromBlob(inputFeatures.data, inputFeatures.shape.dims()))

    override fun textDecoder(inputsEmbeds: FloatTensor, positionIds: LongTensor, cachePosition: LongTensor): FloatTensor {
        val positions = EValue.from(Tensor.fromBlob(positionIds.data, positionIds.shape.dims()))
        val slots = EValue.from(Tensor.fromBlob(cachePosition.data, cachePosition.shape.dims()))
        var x = inputsEmbeds
        // one program, or the decoder's parts in layer order: hidden states flow from each to the next
        for (p in manifest.component(BundleManifest.COMPONENT_DECODER).programs) {
            val out = module(p.file).execute(p.method, EValue.from(Tensor.fromBlob(x.data, x.shape.dims())), positions, slots)[0].toTensor()
            x = FloatTensor(out.shape().map { it.toInt() }.toIntArray(), out.dataAsFloatArray)
        }
        return x
    }

    override fun reset() = Unit

    fun close() {
        modules.values.forEach { it.destroy() }
        modules.clear()
    }
}

/**
 * The static graphs of a qnn bundle (one method per graph: model.pte, and one file per part of a
 * decoder lowered in parts), for [StaticGraphRuntime].
 */
class ExecuTorchGraphRunner(private val dir: File, private val manifest: BundleManifest) : GraphRunner {
    private val modules = HashMap<String, Module>()

    private fun module(file: String): Module = modules.getOrPut(file) {
        Module.load(File(dir, file).absolutePath, Module.LOAD_MODE_MMAP)
    }

    override fun run(graph: String, inputs: LinkedHashMap<String, Any>): List<FloatTensor> {
        val values = inputs.values.map { v ->
            when (v) {
                is FloatTensor -> EValue.from(Tensor.fromBlob(v.data, LongArray(v.shape.size) { v.shape[it].toLong() }))
                is LongTensor -> EValue.from(Tensor.fromBlob(v.data, LongArray(v.shape.size) { v.shape[it].toLong() }))
                else -> throw IllegalArgumentException("input of type ${v.javaClass}")
            }
        }.toTypedArray()
        val spec = manifest.graphs.getValue(graph)
        return module(spec.file).execute(spec.method, *values).map { e ->
            val t = e.toTensor()
            FloatTensor(t.shape().map { it.toInt() }.toIntArray(), t.dataAsFloatArray)
        }
    }

    fun close() {
        modules.values.forEach { it.destroy() }
        modules.clear()
    }
}

/** The runtime a bundle needs: dynamic-shape methods (xnnpack) or static graphs (qnn). */
fun openRuntime(dir: File, manifest: BundleManifest): ModelRuntime =
    if (manifest.isStatic) StaticGraphRuntime(manifest, ExecuTorchGraphRunner(dir, manifest)) else ExecuTorchRuntime(dir, manifest)
