"""Verification stage: the bundle's own runtime against PyTorch, per component and end to end.

For every component two comparisons on the same inputs:
* lowering  — bundle vs the PyTorch reference with the *same* quantized weights (gated);
* quantization — PyTorch with quantized weights vs fp32 (reported; gated for fp16 components).
End to end: greedy generation from the golden image + prompt, bundle vs quantized reference
(gated), and quantized vs fp32 reference (reported). Thresholds come from the recipe.
The bundle's side of every check runs first (``run_bundle``) and its runtime is closed before any
reference loads (``check_references``): at 9B widths each holds gigabytes.
The fp32 references are loaded one component at a time, the decoder one layer at a time; the
fp32 greedy run (every component at once) is skipped, and says so, when it would not fit beside
what is held in ``memory_budget_bytes``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, open_checkpoint
from .components import Shapes
from .errors import BundleError, ExportError
from .host.generate import EagerRuntime, Trace, call_component, generate
from .host.golden import GOLDEN_PROMPT, golden_image
from .host.image import ImagePreprocessing, preprocess_image
from .host.conversation import build_chat_prompt
from .host.prompt import AUDIO, IMAGE
from .load import build_on_meta, load_component, load_shared
from .metrics import compare, passes
from .methods import VISION_METHOD, is_vision_method
from .planning import plan_quantization
from .progress import silent
from .quantize import FLOAT_DTYPES, ComponentPlan, dequantize_per_call, quantize_hook
from .recipe import Recipe
from .targets.contract import Target
from .targets.shared.export_caches import return_freed_memory
from .targets.shared.fx_provenance import share_node_provenance
from .targets.shared.memory_fit import resident_bytes

DECODE_STEPS = 8
FP32_GREEDY_OVERHEAD = 1.25


def memory_budget_bytes() -> int:
    from .targets.shared.memory_fit import physical_memory_bytes

    return int(physical_memory_bytes() * 0.5)


def load_reference(
    ckpt: Checkpoint,
    name: str,
    shapes: Shapes,
    plan: ComponentPlan | None,
    tgt: Target,
    bundle: Path | None = None,
    manifest: dict | None = None,
    per_call: bool = True,
) -> torch.nn.Module:
    """One component in PyTorch: quantized exactly as exported (``plan``) or fp32 (``None``).

    Targets that quantize in PyTorch get the same torchao configuration; targets that quantize
    the exported graph (onnx) get the weights read back from the bundle (``per_call`` False: as
    plain weights, for a module that is exported again)."""
    comp = ckpt.family.components.get(name)
    meta = build_on_meta(lambda: comp.build(ckpt.spec, shapes))
    if plan is None:
        return load_component(meta, ckpt, torch.float32)
    if tgt.capabilities.own_reference:  # targets whose reference is not a PyTorch module

        def load(layers=None):  # layers: one part of the decoder (targets that rebuild a decoder in parts)
            part = (
                meta
                if layers is None
                else build_on_meta(lambda: ckpt.family.decoder_layers(ckpt.spec, shapes.max_context, layers))
            )
            return load_component(part, ckpt, torch.float32)

        ref = tgt.reference_component(name, plan, bundle, manifest, load=load)
        if ref is not None:
            return ref
    if tgt.capabilities.quantizes_in_torch:
        return dequantize_per_call(
            load_component(meta, ckpt, FLOAT_DTYPES[plan.dtype], on_module=quantize_hook(plan, tgt.torchao_config))
        )
    if not plan.quantized:
        return load_component(meta, ckpt, FLOAT_DTYPES[plan.dtype])
    weights = tgt.bundle_weights(name, meta, bundle, manifest, per_call)
    module = load_component(meta, ckpt, FLOAT_DTYPES[plan.dtype], on_module=weights)
    weights.finish()
    return module


class _Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []

    def add(self, name: str, kind: str, figures: dict | None, threshold: float | None, note: str = "", **extra) -> None:
        gated = threshold is not None
        passed = (passes(figures, threshold) if figures else False) if gated else None
        self.checks.append(
            {
                "name": name,
                "kind": kind,
                "threshold_db": threshold,
                "gated": gated,
                "passed": passed,
                "note": note,
                **(figures or {}),
                **extra,
            }
        )

    def finish(self, extra: dict) -> dict:
        failed = [c["name"] for c in self.checks if c["gated"] and not c["passed"]]
        return {"passed": not failed, "failed": failed, "checks": self.checks, **extra}


def decoder_call_inputs(
    embeds: torch.Tensor, positions: np.ndarray, delta: int, chunk: int, tokens: list[int], embed_fn
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs_embeds, position_ids, cache_position) of every decoder call: ``embeds`` prefilled in
    chunks, then ``tokens`` decoded one by one (teacher-forced)."""
    n = embeds.shape[1]
    pos = torch.from_numpy(positions)
    calls = [
        (
            embeds[:, a : min(a + chunk, n)],
            pos[:, a : min(a + chunk, n)].contiguous(),
            torch.arange(a, min(a + chunk, n)),
        )
        for a in range(0, n, chunk)
    ]
    for i, tok in enumerate(tokens):
        calls.append(
            (
                embed_fn(torch.tensor([[tok]])),
                torch.full((3, 1), n + i + delta, dtype=torch.long),
                torch.tensor([n + i]),
            )
        )
    return calls


def decoder_calls(runtime, calls) -> np.ndarray:
    """The decoder's logits for every call of ``calls`` (from an empty cache), stacked."""
    runtime.reset()
    return torch.cat([runtime.text_decoder(*call).reshape(1, -1) for call in calls]).numpy()


def _decoder_calls_by_part(ckpt: Checkpoint, shapes: Shapes, calls, progress=silent) -> np.ndarray:
    """``decoder_calls`` of the fp32 decoder with one decoder layer's weights held at a time.

    The decode steps are teacher-forced (``calls`` are known), so every call's input is known
    before the first: each one-layer part runs the whole sequence of calls on its own cache and its
    hidden states become the next part's inputs. The same arithmetic as the whole decoder, call for
    call (fp32 throughout), for the memory of one layer plus the lm_head instead of all of them."""
    xs = [c[0] for c in calls]
    layers = ckpt.spec.text.num_layers
    for a in range(layers):
        progress(f"fp32 reference for text_decoder: layer {a + 1}/{layers}")
        part = load_component(
            build_on_meta(lambda a=a: ckpt.family.decoder_layers(ckpt.spec, shapes.max_context, (a, a + 1))),
            ckpt,
            torch.float32,
        )
        part.reset_cache()
        xs = [part(x, p, c) for x, (_, p, c) in zip(xs, calls)]
        del part
        release_memory()  # modules sit in reference cycles: free this layer before the next is read
    return torch.cat([o.reshape(1, -1) for o in xs]).numpy()


class GoldenCase:
    """The verification inputs: the golden image (+ the golden audio clip when the model hears)
    and prompt, per-component probe inputs, and the M-RoPE positions of the prompt."""

    def __init__(self, ckpt: Checkpoint, pre: ImagePreprocessing, shapes: Shapes) -> None:
        from .host.audio import AudioPreprocessing, log_mel
        from .host.golden import golden_audio
        from .host.positions import mrope_positions

        tok = ckpt.chat_tokenizer()
        self.image = pre.prepare(golden_image())
        self.pixels = self.image.pixels
        self.features = None
        audio_tokens = None
        if ckpt.spec.audio is not None:
            apre = AudioPreprocessing(frames=shapes.audio_frames, mel_bins=ckpt.spec.audio.num_mel_bins)
            self.features = log_mel(golden_audio(), apre)[None]
            audio_tokens = shapes.audio_frames // 8
        self.prompt = build_chat_prompt(tok, GOLDEN_PROMPT, self.image.tokens, audio_tokens)
        g = torch.Generator().manual_seed(0)
        first = preprocess_image(golden_image(), pre, pre.sizes[0])
        self.inputs = {
            VISION_METHOD: [torch.from_numpy(first), torch.randn(first.shape, generator=g)],
            "token_embedding": [torch.tensor([self.prompt.ids[: shapes.prefill_chunk]]), torch.tensor([[0]])],
        }
        if self.features is not None:
            self.inputs["audio_encoder"] = [
                torch.from_numpy(self.features),
                torch.randn(self.features.shape, generator=g),
            ]
        for i, size in enumerate(pre.sizes[1:], 1):  # every further image bucket: the golden image at its size
            px = preprocess_image(golden_image(), pre, size)
            self.inputs[pre.method(i)] = [torch.from_numpy(px), torch.randn(px.shape, generator=g)]
        self.media = {
            "images": [self.pixels],
            "image_grids": [self.image.grid],
            "image_methods": [self.image.method],
            "audios": [self.features] if self.features is not None else [],
        }
        self.positions, self.delta = mrope_positions(self.prompt.types, [self.image.grid])

    def embeddings(self, modules: dict, chunk: int) -> torch.Tensor:
        """The prompt's input embeddings with image (and audio) encodings in place."""
        ids = torch.tensor([self.prompt.ids])
        embeds = torch.cat(
            [modules["token_embedding"](ids[:, a : a + chunk]) for a in range(0, len(self.prompt), chunk)], dim=1
        )
        encode = modules[self.image.method]
        embeds[0, [i for i, t in enumerate(self.prompt.types) if t == IMAGE]] = encode(torch.from_numpy(self.pixels))
        if self.features is not None:
            embeds[0, [i for i, t in enumerate(self.prompt.types) if t == AUDIO]] = modules["audio_encoder"](
                self.inputs["audio_encoder"][0]
            )
        return embeds


@dataclass
class BundleRun:
    """What the bundle's runtime computed on the golden case. Taken, and the runtime closed, before
    any reference is loaded: at 9B widths each holds gigabytes (the onnx export peaked at 15.3 GiB
    with both), and no check needs both at once."""

    case: GoldenCase
    checks: list[dict]  # the runtime's own contract
    outputs: dict[str, np.ndarray]  # component -> its outputs on ``case.inputs``, concatenated
    calls: list[tuple]  # the teacher-forced decoder calls, inputs only
    decoder: np.ndarray  # the bundle decoder's logits on ``calls``
    decode_steps: int  # of ``calls``, after the prefill's
    trace: Trace  # the bundle's greedy run
    new_tokens: int


def run_bundle(runtime, ckpt: Checkpoint, recipe: Recipe, tgt: Target, pre, progress=silent, *, manifest) -> BundleRun:
    """The bundle's side of every check: its contract, each component on the probe inputs, a greedy
    run, and the decoder on the prompt's embeddings followed by the first greedy tokens fed back."""
    shapes = Shapes.from_recipe(recipe)
    case = GoldenCase(ckpt, pre, shapes)
    checks = tgt.contract_checks(runtime, manifest)
    n_new = min(recipe.parity.greedy_tokens, shapes.max_context - len(case.prompt))
    progress(f"the bundle on the golden case: each component, then greedy generation of {n_new} tokens")
    with torch.no_grad():
        outputs = {
            name: np.concatenate([call_component(runtime, name, x).numpy().ravel() for x in xs])
            for name, xs in case.inputs.items()
        }
        trace = generate(runtime, case.prompt, **case.media, max_new_tokens=n_new)
        # the same decoder inputs go to the reference: the bundle's embeddings (image and audio in
        # place) and its greedy tokens, so a first divergence does not change what is compared
        encoders = {name: (lambda x, name=name: call_component(runtime, name, x).clone()) for name in case.inputs}
        embeds = case.embeddings(encoders, shapes.prefill_chunk)
        feed = trace.tokens[: min(DECODE_STEPS, n_new)]
        calls = decoder_call_inputs(
            embeds, case.positions, case.delta, shapes.prefill_chunk, feed, encoders["token_embedding"]
        )
        decoder = decoder_calls(runtime, calls)
    return BundleRun(case, checks, outputs, calls, decoder, len(feed), trace, n_new)


def verify_runtime(
    open_runtime,
    ckpt: Checkpoint,
    recipe: Recipe,
    tgt: Target,
    plans: dict[str, ComponentPlan],
    pre: ImagePreprocessing,
    progress=silent,
    *,
    bundle: Path,
    manifest: dict,
    beside=None,
) -> dict:
    """The report, in the order that keeps memory down: ``open_runtime()``, the bundle's side of every
    check (and ``beside(runtime)``, a report of its own merged in), the runtime closed and dropped,
    then the references."""
    runtime = open_runtime()
    try:
        seen = run_bundle(runtime, ckpt, recipe, tgt, pre, progress, manifest=manifest)
        extra = beside(runtime) if beside is not None else None
    finally:
        runtime.close()  # e.g. the emulator's process; its memory is free before the references load
    del runtime
    report = check_references(seen, ckpt, recipe, tgt, plans, progress, bundle=bundle, manifest=manifest)
    if extra is not None:
        report["checks"] += extra["checks"]
        report["failed"] += extra["failed"]
        report["passed"] = report["passed"] and extra["passed"]
    return report


def release_memory() -> None:
    """Free what sits in reference cycles (modules, runtimes) now and give it back to the OS."""
    gc.collect()
    return_freed_memory()


def check_references(
    seen: BundleRun,
    ckpt: Checkpoint,
    recipe: Recipe,
    tgt: Target,
    plans: dict[str, ComponentPlan],
    progress=silent,
    *,
    bundle: Path,
    manifest: dict,
) -> dict:
    """The report: ``seen`` (the bundle's side, its runtime closed) against the PyTorch references,
    quantized as exported and fp32, loaded now."""
    shapes = Shapes.from_recipe(recipe)
    par = recipe.parity
    case, n_new = seen.case, seen.new_tokens
    prompt, inputs = case.prompt, case.inputs
    report = _Report()

    # 0. the runtime's own contract (metadata methods), for targets that have one
    report.checks += seen.checks
    checked = tgt.checkpoint_checks(ckpt, shapes, plans, bundle=bundle, manifest=manifest, progress=progress)
    report.checks += checked  # bundle weights vs an independent computation from the checkpoint
    fp32_bytes = sum(4 * i.numel for i in ckpt.tensors.values())
    large = fp32_bytes > memory_budget_bytes() // 8  # a collection costs ~0.25 s: worth it for gigabytes only
    if large:  # the bundle's runtime, closed by the caller
        release_memory()

    # 1. quantized references (as exported) vs the bundle
    progress("loading the PyTorch reference with the exported (quantized) weights")
    q = {}
    for name in plans:
        share = (
            is_vision_method(name)
            and name != VISION_METHOD
            and not tgt.capabilities.own_reference
            and (tgt.capabilities.quantizes_in_torch or not plans[name].quantized)
        )
        if share:  # weights from the checkpoint and the (same) plan alone: the buckets' are the same tensors
            q[name] = load_shared(
                build_on_meta(lambda n=name: ckpt.family.components.get(n).build(ckpt.spec, shapes)),
                q[VISION_METHOD],
                ckpt,
                FLOAT_DTYPES[plans[name].dtype],
            )
        else:
            q[name] = load_reference(ckpt, name, shapes, plans[name], tgt, bundle, manifest)
    qrt = EagerRuntime(q, shapes.max_context, shapes.prefill_chunk)
    outs: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name in inputs:
            outs[name] = np.concatenate([q[name](x).numpy().ravel() for x in inputs[name]])
            report.add(
                f"{name}/lowered_vs_reference",
                "lowering",
                compare(outs[name], seen.outputs[name]),
                _lowering_threshold(plans[name], par),
                "bundle runtime vs PyTorch with the same weights",
            )
        ref = outs["text_decoder"] = decoder_calls(qrt, seen.calls)
        agree = float(np.mean(ref.argmax(-1) == seen.decoder.argmax(-1)))
        report.add(
            "text_decoder/lowered_vs_reference",
            "lowering",
            compare(ref, seen.decoder),
            _lowering_threshold(plans["text_decoder"], par),
            f"prefill of {len(prompt)} tokens in chunks of {shapes.prefill_chunk}, then {seen.decode_steps} decode steps",
            argmax_agreement=agree,
        )

        # 2. end to end, bundle vs quantized reference
        progress(f"greedy generation of {n_new} tokens by the reference")
        ref_trace = generate(qrt, prompt, **case.media, max_new_tokens=n_new)
        report.checks.append(
            _greedy_check(
                "end_to_end/greedy_lowered_vs_reference",
                ref_trace,
                seen.trace,
                par.greedy_agreement,
                gated=par.greedy_agreement is not None,
            )
        )
    del q, qrt
    if large:  # modules sit in reference cycles: the quantized reference is freed here, not later
        release_memory()

    # 3. quantization error: fp32 reference, one component at a time (the decoder one layer at a
    # time); the fp32 greedy run needs every fp32 component at once, beside what is already held,
    # and its loads and activations on top (9B widths, one layer: 1.06 GiB over held + weights)
    budget, held = memory_budget_bytes(), resident_bytes()
    keep_all = held + FP32_GREEDY_OVERHEAD * fp32_bytes <= budget
    f = {}
    with torch.no_grad():
        for name in [*inputs, "text_decoder"]:
            comp_bytes = 4 * sum(ckpt.tensors[k].numel for k in ckpt.family.components.get(name).keys(ckpt.spec))
            fp16 = plans[name].dtype == "fp16" and not plans[name].quantized
            threshold = par.fp16_sqnr_db if fp16 else None
            if name == "text_decoder" and not keep_all:
                ref = _decoder_calls_by_part(ckpt, shapes, seen.calls, progress)
            elif comp_bytes > budget:
                report.add(
                    f"{name}/reference_vs_fp32",
                    "quantization",
                    None,
                    threshold,
                    f"skipped: the fp32 reference needs {comp_bytes / 2**30:.1f} GiB, over this machine's budget",
                )
                continue
            else:
                progress(f"fp32 reference for {name}")
                if is_vision_method(name) and VISION_METHOD in f:  # kept for the greedy run: share its weights
                    mod = load_shared(
                        build_on_meta(lambda n=name: ckpt.family.components.get(n).build(ckpt.spec, shapes)),
                        f[VISION_METHOD],
                        ckpt,
                    )
                else:
                    mod = load_reference(ckpt, name, shapes, None, tgt)
                if name == "text_decoder":
                    eager = EagerRuntime({"text_decoder": mod}, shapes.max_context, shapes.prefill_chunk)
                    ref = decoder_calls(eager, seen.calls)
                    del eager
                else:
                    ref = np.concatenate([mod(x).numpy().ravel() for x in inputs[name]])
                if keep_all:
                    f[name] = mod
                del mod
                if large:
                    gc.collect()
            fig = compare(ref, outs[name])
            report.add(
                f"{name}/reference_vs_fp32",
                "quantization",
                fig,
                threshold,
                "PyTorch with the exported weights vs fp32 (the cost of the recipe)",
            )
        if keep_all and len(f) == len(plans):
            frt = EagerRuntime(f, shapes.max_context, shapes.prefill_chunk)
            fp_trace = generate(frt, prompt, **case.media, max_new_tokens=n_new)
            report.checks.append(
                _greedy_check("end_to_end/greedy_reference_vs_fp32", fp_trace, ref_trace, None, gated=False)
            )
        elif not keep_all:
            report.add(
                "end_to_end/greedy_reference_vs_fp32",
                "quantization",
                None,
                None,
                f"skipped: every fp32 component at once needs {fp32_bytes / 2**30:.1f} GiB (and a quarter more to "
                f"run) beside {held / 2**30:.1f} GiB held, over this machine's budget of {budget / 2**30:.1f} GiB",
            )
    return report.finish(
        {
            "prompt_tokens": len(prompt),
            "greedy_tokens": n_new,
            "reference_tokens": ref_trace.tokens,
            "bundle_tokens": seen.trace.tokens,
        }
    )


def against_onnxruntime(
    bundle_runtime,
    ckpt: Checkpoint,
    recipe: Recipe,
    tgt: Target,
    plans: dict[str, ComponentPlan],
    pre: ImagePreprocessing,
    progress=silent,
    *,
    bundle: Path,
    manifest: dict,
) -> dict:
    """The independent-runtime gate: the PyTorch reference of each component (the same weights, and
    for torchao-quantized targets the same dynamic activation quantization) exported to ONNX and run
    in ONNX Runtime, compared with the bundle and with PyTorch on the same inputs."""
    import tempfile

    from .targets import get_target
    from .targets.onnx.target import OnnxRuntime

    own = tgt.against_onnxruntime(
        bundle_runtime=bundle_runtime,
        ckpt=ckpt,
        recipe=recipe,
        plans=plans,
        pre=pre,
        progress=progress,
        bundle=bundle,
        manifest=manifest,
    )
    if own is not None:  # targets whose reference ONNX Runtime cannot take as is
        return own
    onnx_target = get_target("onnx")
    shapes = Shapes.from_recipe(recipe)
    par = recipe.parity
    report = _Report()
    progress("exporting the same components, same weights, to ONNX for ONNX Runtime")
    refs = {n: load_reference(ckpt, n, shapes, plans[n], tgt, bundle, manifest, per_call=False) for n in plans}
    with tempfile.TemporaryDirectory(prefix="autoglm-ort-") as tmp:
        files = {}
        for name in refs:
            # the reference module as it is: torchao-quantized modules export with their
            # activation quantization spelled out in plain ONNX ops, so ORT runs the same math
            module = load_reference(ckpt, name, shapes, plans[name], tgt, bundle, manifest, per_call=False)
            prog = onnx_target.export(name, module, shapes.prefill_chunk)
            as_is = ComponentPlan(name, "fp32", {})  # no further quantization
            onnx_target.lower({name: prog}, {}, Path(tmp), silent, {name: as_is})
            files[name] = Path(tmp) / f"{name}.onnx"
            del module, prog
        t = ckpt.spec.text
        ort_rt = OnnxRuntime(
            files, [1, t.num_kv_heads, shapes.max_context, t.head_dim], shapes.max_context, shapes.prefill_chunk
        )
        case = GoldenCase(ckpt, pre, shapes)
        prompt, positions, delta = case.prompt, case.positions, case.delta
        qrt = EagerRuntime(refs, shapes.max_context, shapes.prefill_chunk)
        with torch.no_grad():
            inputs = {name: xs[0] for name, xs in case.inputs.items()}
            for name, x in inputs.items():
                o = call_component(ort_rt, name, x).numpy()
                thr = _lowering_threshold(plans[name], par)
                report.add(
                    f"onnxruntime/{name}_vs_bundle",
                    "independent",
                    compare(o, call_component(bundle_runtime, name, x).numpy()),
                    thr,
                )
                report.add(f"onnxruntime/{name}_vs_reference", "independent", compare(refs[name](x).numpy(), o), thr)
            embeds = case.embeddings(refs, shapes.prefill_chunk)
            n_new = min(par.greedy_tokens, shapes.max_context - len(prompt))
            ort_trace = generate(ort_rt, prompt, **case.media, max_new_tokens=n_new)
            feed = ort_trace.tokens[:DECODE_STEPS]
            calls = decoder_call_inputs(embeds, positions, delta, shapes.prefill_chunk, feed, refs["token_embedding"])
            o = decoder_calls(ort_rt, calls)
            thr = _lowering_threshold(plans["text_decoder"], par)
            report.add(
                "onnxruntime/text_decoder_vs_bundle",
                "independent",
                compare(o, decoder_calls(bundle_runtime, calls)),
                thr,
            )
            report.add(
                "onnxruntime/text_decoder_vs_reference", "independent", compare(decoder_calls(qrt, calls), o), thr
            )
            got = generate(bundle_runtime, prompt, **case.media, max_new_tokens=n_new)
            report.checks.append(
                _greedy_check(
                    "onnxruntime/greedy_vs_bundle",
                    ort_trace,
                    got,
                    par.greedy_agreement,
                    gated=par.greedy_agreement is not None,
                )
            )
        del ort_rt
    return report.finish({"against": "onnxruntime"})


def _lowering_threshold(plan: ComponentPlan, par) -> float:
    if plan.quantized:
        return par.quantized_sqnr_db
    return par.float_sqnr_db if plan.dtype == "fp32" else par.fp16_sqnr_db


def _greedy_check(name: str, ref: Trace, got: Trace, threshold: float | None, gated: bool) -> dict:
    n = min(len(ref.tokens), len(got.tokens))
    same = sum(a == b for a, b in zip(ref.tokens, got.tokens))
    agreement = same / max(len(ref.tokens), 1)
    first = next((i for i, (a, b) in enumerate(zip(ref.tokens, got.tokens)) if a != b), None)
    return {
        "name": name,
        "kind": "end_to_end",
        "gated": gated,
        "threshold_agreement": threshold,
        "passed": (agreement >= threshold) if gated else None,
        "agreement": round(agreement, 4),
        "tokens": n,
        "first_divergence": first,
        "note": "greedy, image + text prompt",
    }


def format_report(report: dict) -> str:
    w = max([46] + [len(c["name"]) + 2 for c in report["checks"]])
    rows = [f"{'check':<{w}}{'SQNR dB':>9}{'cosine':>11}{'max-abs':>11}{'gate':>8}  result"]
    for c in report["checks"]:
        if c["kind"] == "contract":
            if "detail" in c:
                detail = c["detail"]
            else:
                detail = (
                    "all values as the manifest says"
                    if c["passed"]
                    else f"mismatch {c['mismatched']} missing {c['missing_methods']}"
                )
            rows.append(f"{c['name']:<{w}}{detail:>31}{'=':>8}  {'PASS' if c['passed'] else 'FAIL'}")
            continue
        if c["kind"] == "end_to_end":
            gate = f"{c['threshold_agreement']:.0%}" if c["gated"] else "-"
            value = f"{c['agreement']:.1%} of {c['tokens']} tokens agree"
            result = ("PASS" if c["passed"] else "FAIL") if c["gated"] else "reported"
            rows.append(f"{c['name']:<{w}}{value:>31}{gate:>8}  {result}")
            continue
        if "finite" not in c:
            rows.append(f"{c['name']:<{w}}{'':>31}{'-':>8}  {c['note']}")
            continue
        sq = "exact" if c["bit_exact"] else ("nan" if c["sqnr_db"] is None else f"{c['sqnr_db']:.1f}")
        ma = "nan" if c["max_abs"] is None else f"{c['max_abs']:.2e}"
        gate = f">={c['threshold_db']:.0f}" if c["gated"] else "-"
        result = ("PASS" if c["passed"] else "FAIL") if c["gated"] else "reported"
        rows.append(f"{c['name']:<{w}}{sq:>9}{c['cosine']:>11.6f}{ma:>11}{gate:>8}  {result}")
    rows.append(f"overall: {'PASS' if report['passed'] else 'FAIL: ' + ', '.join(report['failed'])}")
    return "\n".join(rows)


def configure_for_bundle(
    tgt: Target, bundle: Path, manifest: dict, recipe: Recipe, ckpt: Checkpoint
) -> tuple[Shapes, dict[str, ComponentPlan], ImagePreprocessing]:
    """``tgt`` set up as it was for the export of ``bundle`` (recipe, tokenizer, preprocessing, the
    same calibration files); returns the shapes, each component's plan and the preprocessing."""
    shapes = Shapes.from_recipe(recipe)
    plans = plan_quantization(recipe, ckpt, shapes, str(bundle / "manifest.json"))
    pre = ImagePreprocessing.from_json(manifest["preprocessing"])
    # calibration files resolve against the recipe's own directory
    tgt.configure(
        recipe,
        str(bundle / "manifest.json"),
        tokenizer=ckpt.chat_tokenizer(),
        pre=pre,
        base=Path(manifest["recipe"]["file"]).parent,
    )
    recorded = (manifest.get("calibration") or {}).get("files", {})
    if recorded:
        from .calibration import check_unchanged

        check_unchanged(recorded, tgt.calibration_set, bundle / "manifest.json")
    tgt.check_plans(plans, str(bundle / "manifest.json"))
    return shapes, plans, pre


def verify_bundle(
    bundle: str | Path, *, checkpoint: str | Path | None = None, against: str | None = None, progress=silent
) -> dict:
    from .bundle import load_bundle
    from .targets import get_target, open_bundle_runtime
    from .recipe import parse_recipe

    if against not in (None, "onnxruntime"):
        raise ExportError(
            "unknown independent runtime",
            field="--against",
            expected="onnxruntime",
            got=repr(against),
            fix="use --against onnxruntime or omit the option",
        )
    bundle = Path(bundle)
    share_node_provenance()  # qnn rebuilds its PT2E reference through torch.export's passes
    manifest = load_bundle(bundle)
    tgt = get_target(manifest["target"])
    if against:  # fail before minutes of checks, not after
        tgt.refuse_against(against, bundle)
    recipe = parse_recipe(manifest["recipe"]["content"], bundle / "manifest.json")
    ckpt_path = Path(checkpoint) if checkpoint else Path(manifest["source"]["checkpoint"])
    if not ckpt_path.is_dir():
        raise BundleError(
            "the checkpoint this bundle was exported from is not at its recorded path",
            file=ckpt_path,
            fix="pass --checkpoint DIR pointing at the same checkpoint",
        )
    ckpt = open_checkpoint(ckpt_path)
    progress("hashing the checkpoint")
    if ckpt.fingerprint() != manifest["source"]["sha256"]:
        raise BundleError(
            "checkpoint differs from the one this bundle was exported from",
            file=ckpt_path,
            field="source.sha256",
            fix="pass --checkpoint with the original checkpoint",
        )
    shapes, plans, pre = configure_for_bundle(tgt, bundle, manifest, recipe, ckpt)
    report = verify_runtime(
        lambda: open_bundle_runtime(tgt, bundle, manifest),
        ckpt,
        recipe,
        tgt,
        plans,
        pre,
        progress,
        bundle=bundle,
        manifest=manifest,
        beside=(  # ONNX Runtime's copy of the references and the bundle, side by side
            (
                lambda rt: against_onnxruntime(
                    rt, ckpt, recipe, tgt, plans, pre, progress, bundle=bundle, manifest=manifest
                )
            )
            if against == "onnxruntime"
            else None
        ),
    )
    print(format_report(report))
    return report
