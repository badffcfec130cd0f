"""Full-size export (not in CI): a 9B-shaped checkpoint with all 40 decoder layers and the 24-block
ViT (10.29 B parameters, ~20.6 GB of bf16 shards), exported once per target, with the peak memory
of the whole process tree (bench/measure.py), wall time, bundle size and the largest files.

    python bench/full.py [--targets xnnpack:recipes/xnnpack-compact.yaml] [--work DIR] [--keep] [--timeout S]

Needs ~21 GB of disk for the checkpoint plus the bundle's size. Results: bench/results/full.json
(rows of a later run replace those of the same target) and a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import write_9b_shape_checkpoint  # noqa: E402
from scale import FULL_LAYERS, FULL_VISION_DEPTH, GGUF_Q4_K_M_BYTES, RESULTS, _cores, replace_doc_block, run_one  # noqa: E402

_BEGIN, _END = "<!-- full-bench -->", "<!-- /full-bench -->"


def write_doc(result: dict) -> None:
    gguf = sum(GGUF_Q4_K_M_BYTES.values())
    lines = [
        _BEGIN,
        f"Written by `bench/full.py` ({result['machine']}, {result['memory_gib']:.0f} GiB RAM): "
        f"{FULL_LAYERS} decoder layers, ViT depth {FULL_VISION_DEPTH}, {result['params']:,} parameters; "
        f"checkpoint written in {result['checkpoint_s']:.0f} s; exports without the parity stage.",
        "",
        "| target | status | wall s | peak tree GiB | max process GiB | bundle GB | vs Q4_K_M GGUF (7.40 GB) | files |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if r.get("status") == "ok":
            tree = f"{r['tree_peak_bytes'] / 2**30:.2f}" if r["tree_peak_bytes"] else "n/a"
            lines.append(
                f"| {r['target']} | ok | {r['wall_s']:.0f} | {tree} | {r['max_process_rss_bytes'] / 2**30:.2f} | "
                f"{r['bundle_bytes'] / 1e9:.3f} | {r['bundle_bytes'] / gguf:.2f}x | {r['files']} |"
            )
        else:
            wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
            peak = f"{r['max_process_rss_bytes'] / 2**30:.2f}" if r.get("max_process_rss_bytes") else ""
            lines.append(f"| {r['target']} | {r['status']} | {wall} | | {peak} | | | |")
    lines.append(_END)
    replace_doc_block(lines, _BEGIN, _END, "## Full size (40 layers, 24 ViT blocks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="xnnpack:recipes/xnnpack-compact.yaml")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles in --work")
    ap.add_argument(
        "--timeout", type=float, default=None, help="seconds before an export is stopped and recorded as such"
    )
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="autoglm-full-"))
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "full.json"
    result = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    ckpt = work / "ckpt-full"
    t0 = time.monotonic()
    if not (ckpt / "model.safetensors.index.json").is_file():
        write_9b_shape_checkpoint(ckpt, FULL_LAYERS, FULL_VISION_DEPTH)
        result["checkpoint_s"] = round(time.monotonic() - t0, 1)
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.targets.shared.memory_fit import physical_memory_bytes

    params = sum(t.numel for t in open_checkpoint(ckpt).tensors.values())  # from the shard headers
    result.update(
        machine=f"{platform.machine()}, {platform.system()}, {_cores()} cores",
        memory_gib=physical_memory_bytes() / 2**30,
        params=params,
    )
    for spec in args.targets.split(","):
        target, _, recipe = spec.partition(":")
        label, tag = (f"{target} ({Path(recipe).stem})", Path(recipe).stem) if recipe else (target, target)
        out = work / f"bundle-{tag}"
        print(f"{label} ...", flush=True)
        r = run_one(ckpt, target, out, recipe, False, work / f"{tag}.log", args.timeout)
        r["target"] = label
        if r["status"] == "ok":
            files = json.loads((out / "manifest.json").read_text())["files"]
            r["files"] = len(files)
            r["largest_files"] = sorted(((n, e["bytes"]) for n, e in files.items()), key=lambda x: -x[1])[:5]
        result["runs"] = [x for x in result["runs"] if x["target"] != label] + [r]
        print(json.dumps({k: v for k, v in r.items() if k not in ("components", "log_tail")}), flush=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    write_doc(result)


if __name__ == "__main__":
    main()
