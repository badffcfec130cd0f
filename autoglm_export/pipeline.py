"""``export()``: load -> split -> quantize -> lower -> verify -> write bundle.

Each stage is its own module; this one only orders them. The bundle is assembled in a
temporary directory and renamed into place after verification, so a failure or Ctrl-C never
leaves a partial bundle, and an existing ``out`` is replaced only with ``force``.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

from .bundle import MANIFEST, REPORT, SCHEMA_VERSION, file_entries, library_versions, write_json
from .checkpoint import Checkpoint, open_checkpoint
from .components import Shapes
from .errors import ExportError, RecipeError, excerpt
from .fsutil import atomic_output_dir, check_output, load_json, sha256_file
from .host.audio import AudioPreprocessing
from .host.chat_template import TEMPLATE_FILE, ChatTemplate, find_chat_template
from .host.prompt_layout import prompt_layout
from .host.image import ImagePreprocessing
from .host.tokenizer import ChatTokenizer
from .load import build_on_meta, load_component
from .progress import Progress, silent
from .quantize import FLOAT_DTYPES, quantize_hook, unused_rules
from .recipe import Recipe, default_recipe_path, load_recipe
from .targets import Target, get_target
from .targets.shared.export_caches import return_freed_memory
from .targets.shared.fx_provenance import share_node_provenance
from .planning import plan_quantization
from .verify import format_report, verify_runtime


def decoder_parts(num_layers: int, per_program: int | None) -> list[tuple[int, int]]:
    """Layer ranges [a, b) of the decoder's programs: one, or runs of ``per_program`` layers."""
    step = per_program or num_layers
    return [(a, min(a + step, num_layers)) for a in range(0, num_layers, step)]


def check_recipe_fits(recipe: Recipe, ckpt: Checkpoint, recipe_file: Path) -> None:
    """Shape rules that depend on the checkpoint as well as the recipe."""
    v, t = ckpt.spec.vision, ckpt.spec.text
    factor = v.patch_size * v.spatial_merge_size
    problems = []
    field = "shapes.images" if recipe.shapes.images is not None else "shapes.image_size"
    for h, w in recipe.shapes.buckets:
        if h % factor or w % factor:
            problems.append(
                f"{field}: {h} x {w} must be a multiple of patch_size x spatial_merge_size = {factor} on "
                "both sides for this checkpoint"
            )
    if recipe.shapes.max_context > t.max_position_embeddings:
        problems.append(
            f"shapes.max_context = {recipe.shapes.max_context}: exceeds the model's "
            f"max_position_embeddings {t.max_position_embeddings}"
        )
    image_tokens = max((h // factor) * (w // factor) for h, w in recipe.shapes.buckets)
    audio_tokens = 0
    if ckpt.spec.audio is not None:
        frames = round(recipe.shapes.audio_seconds * 100)
        audio_tokens = frames // 8
        if frames // 2 > ckpt.spec.audio.max_position_embeddings:
            problems.append(
                f"shapes.audio_seconds = {recipe.shapes.audio_seconds}: {frames // 2} encoder positions exceed "
                f"the audio tower's max_position_embeddings {ckpt.spec.audio.max_position_embeddings}"
            )
    if image_tokens + audio_tokens + 16 > recipe.shapes.max_context:
        problems.append(
            f"shapes.max_context = {recipe.shapes.max_context}: too small for one image ({image_tokens} "
            f"tokens){f' and one audio clip ({audio_tokens} tokens)' if audio_tokens else ''} plus a prompt; "
            "raise it or use smaller images / audio_seconds"
        )
    if problems:
        raise RecipeError(recipe_file, problems)


def report_plan_notes(rec: Recipe, plans: dict, say) -> None:
    """What the plan changed or ignored of the recipe, said before the work starts."""
    for i in unused_rules(rec, plans):
        say(
            f"warning: quantization[{i}] (match {excerpt(repr(rec.quantization[i].match), 60)}) matches no weight of "
            "this checkpoint and has no effect"
        )
    seen = set()
    for plan in plans.values():
        if plan.component in seen:  # the image buckets' vision methods: one tower, said once
            continue
        seen.add(plan.component)
        by_choice: dict[tuple, list[str]] = {}
        for weight, f in plan.group_fallbacks().items():
            by_choice.setdefault((f["rule_group_size"], f["scheme"], f["group_size"]), []).append(weight)
        for (rule_group, scheme, used), weights in sorted(by_choice.items(), key=str):
            how = (
                "int8, one scale per output channel (this target has no per-channel int4)"
                if scheme == "int8"
                else "one scale per output channel"
                if used == "channel"
                else f"groups of {used}"
            )
            widths = sorted({plan.weights[w.removeprefix(plan.component + ".")].shape[-1] for w in weights})
            say(
                f"{plan.component}: int4 group {rule_group} does not divide the input width ({', '.join(map(str, widths))}) "
                f"of {len(weights)} weight(s), e.g. {weights[0]}; using {how} for them (manifest: int4_group_fallbacks)"
            )


def model_metadata(ckpt: Checkpoint, tokenizer: ChatTokenizer, shapes: Shapes) -> dict:
    return {
        "max_context": shapes.max_context,
        "eos_ids": list(ckpt.spec.tokens.eos_token_ids),
        "bos_id": tokenizer.special[ckpt.family.bos_token],
        "vocab_size": ckpt.spec.text.vocab_size,
    }


@dataclass
class ExportJob:
    """What the stages of one export share: the inputs, read and checked, and the plan."""

    target: str
    tgt: Target
    recipe_file: Path
    recipe: Recipe
    ckpt: Checkpoint
    tokenizer: ChatTokenizer
    shapes: Shapes
    pre: ImagePreprocessing
    plans: dict
    parts: list[tuple[int, int]] | None  # decoder layer ranges, when the recipe lowers it in parts
    progress: Progress

    def say(self, stage: str):
        return self.progress.stage(stage)


def export(
    *, checkpoint, target: str, out, recipe=None, force: bool = False, progress=silent, verify: bool = True
) -> dict:
    """Export ``checkpoint`` for ``target`` into ``out``. ``verify=False`` (library only, for
    bench/scale.py's compile-time and memory measurements) skips the parity stage and says so in
    the manifest; the CLI always verifies."""
    out = Path(out)
    share_node_provenance()  # lowering's torch.fx passes: ~7-12% of their CPU time was copying provenance
    # qnn quantizes and lowers inside export(): minutes that report there; nothing keeps an emulator
    # twin of a shared-weight program for a verification that will not run
    tgt = get_target(target, progress=progress.stage(f"lower/{target}"), verifying=verify)
    recipe_file = Path(recipe) if recipe else default_recipe_path(target)
    inputs = (Path(checkpoint), recipe_file)
    check_output(out, force=force, protected=inputs)  # before any work; --force replaces bundles only
    job = plan_export(checkpoint, target, tgt, recipe_file, progress)
    with atomic_output_dir(out, force=force, protected=inputs, on_note=job.say("bundle")) as tmp:
        lowered = lower_components(job, tmp)
        extra_files, chat_template = copy_tokenizer_files(job, tmp)
        job.say("verify")("hashing the source checkpoint")
        manifest = build_manifest(job, lowered, chat_template=chat_template)
        files = lowered["files"] + extra_files
        manifest["files"] = file_entries(tmp, files)  # before verification: runtimes find data files through it
        report = verify_in_place(job, tmp, manifest) if verify else skip_verification(job)
        manifest["verification"] = (
            {"passed": report["passed"], "failed": report["failed"], "report": REPORT}
            if verify
            else {"skipped": report["skipped"]}
        )
        write_json(tmp / MANIFEST, manifest)
        size = sum(e["bytes"] for e in manifest["files"].values())
        job.say("bundle")(f"{out}: {len(files) + 2} files, {size / 1e6:.2f} MB")
    if verify:
        print(format_report(report))
    return report


def plan_export(checkpoint, target: str, tgt: Target, recipe_file: Path, progress: Progress) -> ExportJob:
    """Read and check the recipe and the checkpoint, and plan every weight: every error a user can
    fix is raised here, before any tensor is read."""
    rec = load_recipe(recipe_file)
    if rec.target != target:
        raise RecipeError(
            recipe_file, [f"target = {rec.target!r}: this recipe is for {rec.target}, not --target {target}"]
        )
    ckpt = open_checkpoint(checkpoint)
    tokenizer = ckpt.chat_tokenizer()
    check_recipe_fits(rec, ckpt, recipe_file)
    shapes = Shapes.from_recipe(rec)
    pc_file = ckpt.root / "preprocessor_config.json"
    pc = (
        load_json(pc_file, "preprocessor_config.json", "copy it from the original checkpoint")
        if pc_file.is_file()
        else {}
    )
    pre = ImagePreprocessing.from_checkpoint(
        pc, shapes.buckets, ckpt.spec.vision.patch_size, ckpt.spec.vision.spatial_merge_size, pc_file
    )
    progress.stage("load")(
        f"{ckpt.spec.architecture}: {len(ckpt.tensors)} tensors, "
        f"{sum(i.numel for i in ckpt.tensors.values()):,} parameters"
    )
    plans = plan_quantization(rec, ckpt, shapes, str(recipe_file))
    report_plan_notes(rec, plans, progress.stage("quantize"))
    tgt.configure(rec, str(recipe_file), tokenizer=tokenizer, pre=pre)
    per_program = rec.lowering.decoder_layers_per_program  # a recipe that asks for parts gets them, even one
    parts = decoder_parts(ckpt.spec.text.num_layers, per_program) if per_program else None
    tgt.check_plans(plans, str(recipe_file), parts=parts)
    return ExportJob(target, tgt, recipe_file, rec, ckpt, tokenizer, shapes, pre, plans, parts, progress)


def _export_module(job: ExportJob, name: str, build, plan, hook, label: str):
    """Load ``build()``'s weights (streamed from the shards), torch.export it, and free the module."""
    # a target may load in another float type (coreml: fp16, what it converts and quantizes from)
    dtype = FLOAT_DTYPES[job.tgt.capabilities.load_dtype or plan.dtype]
    return_freed_memory()  # what the last component (and any program written since) freed
    module = load_component(build_on_meta(build), job.ckpt, dtype, on_module=hook)
    job.say("split")(f"torch.export {label}")
    program = job.tgt.export(name, module, job.shapes.prefill_chunk)
    del module
    gc.collect()  # modules sit in reference cycles: without this their weights outlive the lowering
    return program


def lower_components(job: ExportJob, tmp: Path) -> dict:
    """Load, quantize, torch.export and lower every component into ``tmp``; the target's record of
    what it wrote (``files``, ``methods``, target-specific ``manifest`` sections)."""
    tgt, ckpt, shapes, parts = job.tgt, job.ckpt, job.shapes, job.parts
    lower_say = job.say(f"lower/{job.target}")
    programs = {}
    part_results = []
    components = ckpt.family.components.for_spec(ckpt.spec, shapes)
    # a decoder in parts goes first, part by part, so nothing else is held meanwhile; a target
    # that calibrates the decoder on the other components' outputs (qnn) writes those first
    decoder_last = bool(parts) and tgt.capabilities.decoder_parts_last
    if parts:
        components.sort(key=lambda c: (c.name == "text_decoder") == decoder_last)
    lowered = None

    def lower_held() -> dict:
        out = tgt.lower(programs, model_metadata(ckpt, job.tokenizer, shapes), tmp, lower_say, job.plans)
        programs.clear()
        gc.collect()
        return out

    for comp in components:
        plan = job.plans[comp.name]
        s = plan.summary()
        job.say("quantize")(
            f"{comp.name}: {s['params']:,} params, {s['params_by_scheme']}, "
            f"{s['effective_bits_per_weight']} bits/weight"
        )
        hook = quantize_hook(plan, tgt.torchao_config) if tgt.capabilities.quantizes_in_torch else None
        if comp.name == "text_decoder" and parts:
            if decoder_last:
                lowered = lower_held()
            for i, (a, b) in enumerate(parts):
                program = _export_module(
                    job,
                    comp.name,
                    lambda a=a, b=b: ckpt.family.decoder_layers(ckpt.spec, shapes.max_context, (a, b)),
                    plan,
                    hook,
                    f"text_decoder part {i + 1}/{len(parts)} (layers {a}..{b - 1})",
                )
                part = tgt.lower_part(comp.name, program, (a, b), tmp, lower_say, plan)
                part["output"] = "logits [1, V]" if b == ckpt.spec.text.num_layers else "hidden_states [1, T, D]"
                part_results.append(part)
                del program
                gc.collect()
            continue
        programs[comp.name] = _export_module(
            job, comp.name, lambda c=comp: c.build(ckpt.spec, shapes), plan, hook, comp.name
        )
    if lowered is None:
        lowered = lower_held()
    if part_results:
        lowered["files"] += [f for p in part_results for f in p.pop("files", [p["file"]])]
        shared = {}  # what a target records once for the whole decoder (coreml: the rotary table)
        for p in part_results:
            shared.update(p.pop("component", {}))
        lowered["methods"]["text_decoder"] = {"file": part_results[0]["file"], "programs": part_results, **shared}
    return lowered


def copy_tokenizer_files(job: ExportJob, tmp: Path) -> tuple[list[str], str | None]:
    """The tokenizer, and the checkpoint's chat template when it has one (serve and run render
    conversations with it); the files written and the template's text."""
    shutil.copyfile(job.ckpt.tokenizer_path, tmp / "tokenizer.json")
    chat_template = find_chat_template(job.ckpt.root)
    if chat_template is None:
        return ["tokenizer.json"], None
    (tmp / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    return ["tokenizer.json", TEMPLATE_FILE], chat_template


def apps_prompt_layout(job: ExportJob, chat_template: str | None) -> dict:
    """``prompt.layout``: the template (or the built-in layout) as the token pieces the apps
    assemble, checked against the renderer ``run`` and ``serve`` use (``host.prompt_layout``)."""
    if chat_template is None:
        return prompt_layout(job.tokenizer)
    try:
        template = ChatTemplate(chat_template, TEMPLATE_FILE, job.tokenizer)
    except ExportError as e:  # run / serve report it when they open the bundle
        return {"layout": None, "layout_unavailable": f"the chat template does not compile: {e}"[:300]}
    return prompt_layout(job.tokenizer, template)


def build_manifest(job: ExportJob, lowered: dict, *, chat_template: str | None) -> dict:
    """The bundle's manifest (docs/bundle-format.md), without ``files`` and ``verification``."""
    ckpt, shapes, tokenizer, rec = job.ckpt, job.shapes, job.tokenizer, job.recipe
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "autoglm-export bundle",
        "target": job.target,
        "runtime": job.tgt.runtime_name,
        "source": {
            "checkpoint": str(ckpt.root.resolve()),
            "sha256": ckpt.fingerprint(),
            "architecture": ckpt.spec.architecture,
            "config_form": ckpt.spec.config_form,
        },
        "recipe": {
            "file": str(job.recipe_file.resolve()),
            "sha256": sha256_file(job.recipe_file),
            "content": rec.to_json(),
        },
        "shapes": {
            "images": [list(b) for b in shapes.buckets],
            "max_context": shapes.max_context,
            "prefill_chunk": shapes.prefill_chunk,
            "audio_seconds": shapes.audio_seconds,
            "dynamic_dims": {"T": [1, shapes.prefill_chunk]},
        },
        "model": ckpt.spec.to_json(),
        "components": {
            name: {
                "method": name,
                **lowered["methods"][name],
                **ckpt.family.component_io(name, ckpt.spec, shapes),
                "quantization": job.plans[name].summary(),
            }
            for name in job.plans
        },
        "prompt": {
            "template": ckpt.family.prompt_template,
            "special_ids": dict(sorted(tokenizer.special.items())),
            "eos_ids": list(ckpt.spec.tokens.eos_token_ids),
            "pad_id": ckpt.spec.tokens.pad_token_id,
            "bos_id": tokenizer.special[ckpt.family.bos_token],
            **({"chat_template": TEMPLATE_FILE} if chat_template is not None else {}),
            **apps_prompt_layout(job, chat_template),
        },
        "preprocessing": job.pre.to_json(),
        "audio_preprocessing": None
        if ckpt.spec.audio is None
        else AudioPreprocessing(frames=shapes.audio_frames, mel_bins=ckpt.spec.audio.num_mel_bins).to_json(),
        "positions": ckpt.family.positions(ckpt.spec),
        "versions": library_versions(job.tgt.versions()),
        **lowered.get("manifest", {}),  # target-specific sections (e.g. qnn: SoC, SDK, emulator note)
    }


def verify_in_place(job: ExportJob, tmp: Path, manifest: dict) -> dict:
    """The parity stage on the bundle still in its temporary directory; writes ``report.json``."""
    try:
        report = verify_runtime(
            lambda: job.tgt.open_runtime(tmp, manifest),
            job.ckpt,
            job.recipe,
            job.tgt,
            job.plans,
            job.pre,
            job.say("verify"),
            bundle=tmp,
            manifest=manifest,
        )
    finally:
        job.tgt.release()  # e.g. an emulator twin outside the bundle
    report["verified_on"] = f"this host: {job.tgt.runtime_name}"
    write_json(tmp / REPORT, report)
    return report


def skip_verification(job: ExportJob) -> dict:
    job.tgt.release()
    return {
        "passed": None,
        "failed": [],
        "checks": [],
        "skipped": "export(verify=False): a measurement run; "
        "run `autoglm-export verify` on this bundle before using it",
    }
