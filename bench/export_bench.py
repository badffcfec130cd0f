"""Export benchmark (not part of CI): wall time, peak RSS, bundle size, bits per weight, and host
decode speed of the bundle against PyTorch eager on the same model, in the same run.

    python bench/export_bench.py [--checkpoint CKPT] [--recipe FILE] [--name NAME] [--decode-tokens N]

Without --checkpoint a tiny checkpoint is written to a temporary directory. Results go to
bench/results/NAME.json; docs/benchmarks.md is regenerated from every result file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def export(ckpt: Path, recipe: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoglm_export.cli",
            "-q",
            "--target",
            "xnnpack",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--recipe",
            str(recipe),
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"export failed:\n{proc.stderr[-3000:]}")
    # ru_maxrss of the (single-process) export child, in KiB on Linux: the kernel's own accounting
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"export_wall_s": round(wall, 2), "export_peak_rss_bytes": peak}


def decode_speed(runtime, prompt, pixels, grid, n: int) -> float:
    from autoglm_export.host.generate import generate

    generate(runtime, prompt, images=[pixels], image_grids=[grid], max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    trace = generate(runtime, prompt, images=[pixels], image_grids=[grid], max_new_tokens=n)
    total = time.perf_counter() - t0
    # subtract prefill, timed separately
    t1 = time.perf_counter()
    generate(runtime, prompt, images=[pixels], image_grids=[grid], max_new_tokens=1)
    prefill = time.perf_counter() - t1
    return round((len(trace.tokens) - 1) / max(total - prefill, 1e-9), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "xnnpack-tiny.yaml")
    ap.add_argument("--name", default="xnnpack-tiny")
    ap.add_argument("--decode-tokens", type=int, default=32)
    a = ap.parse_args()

    from autoglm_export.bundle import load_bundle
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.components import Shapes
    from autoglm_export.host.generate import EagerRuntime
    from autoglm_export.host.golden import GOLDEN_PROMPT, golden_image
    from autoglm_export.host.image import preprocess_image
    from autoglm_export.host.prompt import build_chat_prompt
    from autoglm_export.targets import get_target
    from autoglm_export.recipe import load_recipe
    from autoglm_export.opened_bundle import open_bundle
    from autoglm_export.planning import plan_quantization
    from autoglm_export.verify import load_reference

    torch.set_num_threads(1)  # eager and ExecuTorch both single-threaded: a like-for-like comparison
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt_dir = a.checkpoint
        if ckpt_dir is None:
            from autoglm_export.tiny import write_tiny_checkpoint

            ckpt_dir = write_tiny_checkpoint(tmp / "ckpt", seed=0)
        result = {
            "name": a.name,
            "recipe": str(a.recipe.relative_to(REPO) if a.recipe.is_relative_to(REPO) else a.recipe),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
            **export(ckpt_dir, a.recipe, tmp / "bundle"),
        }
        manifest = load_bundle(tmp / "bundle")
        params = sum(c["quantization"]["params"] for c in manifest["components"].values())
        pte = manifest["files"]["model.pte"]["bytes"]
        result.update(
            {
                "params": params,
                "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
                "pte_bytes": pte,
                "pte_bits_per_param": round(8 * pte / params, 3),
                "nominal_bits_per_weight": {
                    k: c["quantization"]["effective_bits_per_weight"] for k, c in manifest["components"].items()
                },
            }
        )
        _, bundle_rt, tok, pre = open_bundle(tmp / "bundle")
        recipe = load_recipe(a.recipe)
        shapes = Shapes.from_recipe(recipe)
        ckpt = open_checkpoint(ckpt_dir)
        plans = plan_quantization(recipe, ckpt, shapes, str(a.recipe))
        tgt = get_target("xnnpack")
        prompt = build_chat_prompt(tok, GOLDEN_PROMPT, pre.num_tokens)
        pixels = preprocess_image(golden_image(), pre, pre.sizes[0])
        n = min(a.decode_tokens, shapes.max_context - len(prompt))
        q = EagerRuntime(
            {k: load_reference(ckpt, k, shapes, plans[k], tgt) for k in plans}, shapes.max_context, shapes.prefill_chunk
        )
        f = EagerRuntime(
            {k: load_reference(ckpt, k, shapes, None, tgt) for k in plans}, shapes.max_context, shapes.prefill_chunk
        )
        result["decode_tokens"] = n
        result["decode_tok_s"] = {
            "executorch_pte": decode_speed(bundle_rt, prompt, pixels, pre.merged_grid, n),
            "pytorch_eager_quantized": decode_speed(q, prompt, pixels, pre.merged_grid, n),
            "pytorch_eager_fp32": decode_speed(f, prompt, pixels, pre.merged_grid, n),
        }
        result["threads"] = 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    write_doc()


def write_doc() -> None:
    rows = []
    for p in sorted(RESULTS.glob("*.json")):
        r = json.loads(p.read_text())
        if "decode_tok_s" not in r:
            continue
        d = r["decode_tok_s"]
        rows.append(
            f"| {r['name']} | {r['params']:,} | {r['export_wall_s']} | {r['export_peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['bundle_bytes'] / 1e6:.2f} | {r['pte_bits_per_param']} | {d['executorch_pte']} | "
            f"{d['pytorch_eager_quantized']} | {d['pytorch_eager_fp32']} |"
        )
    doc = REPO / "docs" / "benchmarks.md"
    head = doc.read_text().split("<!-- export-bench -->")[0] if doc.exists() else "# Benchmarks\n\n"
    table = "\n".join(
        [
            "<!-- export-bench -->",
            "Written by `bench/export_bench.py` (host CPU, 1 thread, decode of the golden image + prompt).",
            "",
            "| run | params | export s | peak RSS MiB | bundle MB | .pte bits/param | decode tok/s .pte | tok/s eager INT4 ref | tok/s eager fp32 |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    doc.write_text(head + table)


if __name__ == "__main__":
    main()
