"""Scale benchmark (not in CI): 9B-shaped checkpoints with N decoder layers, exported per target,
with the peak memory of the whole process tree (bench/measure.py), wall time and bundle size;
time and size are fitted linearly in N and extrapolated to the real 40 layers.

    python bench/scale.py [--targets xnnpack,onnx,qnn,coreml,xnnpack:recipes/xnnpack-compact.yaml] [--layers 1,2,4,8] [--vision-depth 1]
                          [--name scale] [--work DIR] [--verify]

Checkpoints are written with ``tiny-checkpoint --preset 9b-shape`` (real widths: hidden 4096,
vocab 151552, 32/2 heads, ViT 1536 wide) into --work (default: a temporary directory) and removed
after each N. Exports run through ``pipeline.export(verify=False)`` by default: the x86 HTP
emulator and the reference runs are far too slow at full width; --verify runs them anyway.
Results: bench/results/NAME.json (a later run with the same NAME, vision depth and --verify replaces
the rows of the (target, N) pairs it measures and keeps the others); docs/benchmarks.md gets a table
and an SVG plot of every row. --timeout stops an export that runs longer and records it as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure, write_9b_shape_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
FULL_LAYERS, FULL_VISION_DEPTH = 40, 24
GGUF_Q4_K_M_BYTES = {"text": 5.74e9, "vision": 1.66e9}  # published AutoGLM-Phone-9B Q4_K_M GGUF files
IMPLEMENTED = ("xnnpack", "onnx", "onnx-qnn", "qnn", "coreml")

_EXPORT = (
    "import sys; from autoglm_export.pipeline import export; from autoglm_export.progress import quiet_third_party_logs\n"
    "from autoglm_export.progress import Progress\n"
    "quiet_third_party_logs()\n"
    "export(checkpoint=sys.argv[1], target=sys.argv[2], out=sys.argv[3], recipe=sys.argv[4] or None, force=True, "
    "verify=sys.argv[5] == '1', progress=Progress(quiet=False))\n"
)


def run_one(
    ckpt: Path, target: str, out: Path, recipe: str, verify: bool, log: Path, timeout: float | None = None
) -> dict:
    if target not in IMPLEMENTED:
        return {"target": target, "status": f"not implemented yet ({target} target: see its issue)"}
    r = measure(
        [sys.executable, "-c", _EXPORT, str(ckpt), target, str(out), recipe, "1" if verify else "0"],
        log=log,
        timeout=timeout,
    )
    if r.get("timed_out"):
        return {"target": target, "status": f"stopped after {timeout:.0f} s (not finished)", **r}
    if r["rc"] != 0:
        tail = log.read_text()[-1500:] if log.is_file() else ""
        return {"target": target, "status": f"failed (exit {r['rc']})", "log_tail": tail, **r}
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(e["bytes"] for e in manifest["files"].values())
    comps = {n: c["quantization"] for n, c in manifest["components"].items()}
    return {"target": target, "status": "ok", **r, "bundle_bytes": size, "components": comps}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def summarize(rows: list[dict], vision_depth: int) -> dict:
    out = {}
    for target in sorted({r["target"] for r in rows}):
        ok = [r for r in rows if r["target"] == target and r.get("status") == "ok"]
        if len(ok) < 2:
            continue
        ns = [r["layers"] for r in ok]
        a_t, b_t = fit(ns, [r["wall_s"] for r in ok])
        a_s, b_s = fit(ns, [r["bundle_bytes"] for r in ok])
        peaks = [r["tree_peak_bytes"] or r["max_process_rss_bytes"] for r in ok]
        a_m, b_m = fit(ns, peaks)
        _, b_p = fit(ns, [r["max_process_rss_bytes"] for r in ok])
        # the ViT blocks missing from the measured checkpoints, at the bits the recipe plans for one
        # block (not the component's average: at depth 1 its fp32 patch embedding, position table and
        # norms weigh far more than in 24 blocks)
        v_bytes_per_block = vision_block_bytes(target)
        size_full = a_s + b_s * FULL_LAYERS + v_bytes_per_block * (FULL_VISION_DEPTH - vision_depth)
        out[target] = {
            "time_s": {
                "intercept": round(a_t, 1),
                "per_layer": round(b_t, 2),
                "at_40_layers": round(a_t + b_t * FULL_LAYERS),
            },
            "bundle_bytes": {
                "intercept": round(a_s),
                "per_layer": round(b_s),
                "at_40_layers_24_blocks": round(size_full),
            },
            "peak_bytes": {
                "min": min(peaks),
                "max": max(peaks),
                "per_layer_slope": round(b_m),
                "process_rss_per_layer_slope": round(b_p),
            },
            "vs_gguf_q4_k_m": round(size_full / sum(GGUF_Q4_K_M_BYTES.values()), 3),
        }
    return out


def vision_block_bytes(label: str) -> float:
    """Planned bytes of one ViT block of the 9B layout under the recipe a row was measured with
    ("xnnpack" -> the target's default recipe, "xnnpack (xnnpack-compact)" -> recipes/xnnpack-compact.yaml,
    else bench/recipes/)."""
    import dataclasses

    from autoglm_export.components import Shapes
    from autoglm_export.models.glm4v.spec import parse_config
    from autoglm_export.recipe import default_recipe_path, load_recipe
    from autoglm_export.tiny import PRESETS, make_config
    from autoglm_export.planning import plan_quantization_for_spec

    target, _, stem = label.partition(" (")
    if stem:  # a shipped recipe, or one kept for the bench (bench/recipes)
        name = f"{stem.rstrip(')')}.yaml"
        path = next(
            (d / name for d in (REPO / "recipes", REPO / "bench" / "recipes") if (d / name).is_file()),
            REPO / "recipes" / name,
        )
    else:
        path = default_recipe_path(target)
    rec = load_recipe(path)

    def vision_bytes(depth: int) -> float:
        preset = dataclasses.replace(PRESETS["9b-shape"], layers=1, vision_depth=depth)
        spec = parse_config(
            make_config(preset), Path("config.json"), {"eos_token_id": [151329], "pad_token_id": 151329}
        )
        return plan_quantization_for_spec(rec, spec, Shapes.from_recipe(rec), str(path))["vision_encoder"].weight_bytes

    return vision_bytes(2) - vision_bytes(1)


def svg_plot(rows: list[dict]) -> str:
    """Peak memory (GiB) against layers, one polyline per target; no plotting library needed."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return ""
    W, H, P = 480, 260, 40
    xmax = max(r["layers"] for r in ok)
    ymax = max((r["tree_peak_bytes"] or r["max_process_rss_bytes"]) for r in ok) / 2**30 * 1.15
    colors = {"xnnpack": "#1f77b4", "onnx": "#2ca02c", "qnn": "#d62728", "onnx-qnn": "#9467bd", "coreml": "#ff7f0e"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<line x1="{P}" y1="{H - P}" x2="{W - 10}" y2="{H - P}" stroke="black"/>',
        f'<line x1="{P}" y1="10" x2="{P}" y2="{H - P}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">decoder layers (9B widths)</text>',
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">peak GiB (process tree)</text>',
    ]
    for g in range(0, int(ymax) + 1, max(1, int(ymax) // 5 or 1)):
        y = H - P - g / ymax * (H - P - 10)
        parts.append(f'<text x="{P - 4}" y="{y + 4:.1f}" text-anchor="end">{g}</text>')
    for i, target in enumerate(sorted({r["target"] for r in ok})):
        pts = sorted(
            (r["layers"], (r["tree_peak_bytes"] or r["max_process_rss_bytes"]) / 2**30)
            for r in ok
            if r["target"] == target
        )
        xy = " ".join(f"{P + n / xmax * (W - P - 20):.1f},{H - P - m / ymax * (H - P - 10):.1f}" for n, m in pts)
        c = colors.get(target, "#333")
        parts.append(f'<polyline points="{xy}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts.append(f'<text x="{W - 90}" y="{20 + 14 * i}" fill="{c}">{target}</text>')
    for n in sorted({r["layers"] for r in ok}):
        parts.append(f'<text x="{P + n / xmax * (W - P - 20):.1f}" y="{H - P + 14}" text-anchor="middle">{n}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_doc(result: dict, name: str) -> None:
    rows, summary = result["runs"], result["summary"]
    lines = [
        "<!-- scale-bench -->",
        f"Written by `bench/scale.py` ({result['machine']}); exports "
        f"{'with' if result['verify'] else 'without'} the parity stage, vision depth {result['vision_depth']}.",
        "",
        "| target | layers | status | wall s | peak tree GiB | max process GiB | bundle GB |",
        "|---|---|---|---|---|---|---|",
    ]
    first = {t: i for i, t in enumerate(dict.fromkeys(r["target"] for r in rows))}  # targets as first measured
    for r in sorted(rows, key=lambda r: (first[r["target"]], r["layers"])):
        if r.get("status") == "ok":
            tree = f"{r['tree_peak_bytes'] / 2**30:.2f}" if r["tree_peak_bytes"] else "n/a"
            lines.append(
                f"| {r['target']} | {r['layers']} | ok | {r['wall_s']:.0f} | {tree} | {r['max_process_rss_bytes'] / 2**30:.2f} | "
                f"{r['bundle_bytes'] / 1e9:.2f} |"
            )
        elif "wall_s" in r:  # failed or stopped: what it used until then
            status = "killed (SIGKILL: out of memory)" if r.get("rc") == -9 else r["status"]
            tree = f"{r['tree_peak_bytes'] / 2**30:.2f}" if r.get("tree_peak_bytes") else "n/a"
            lines.append(
                f"| {r['target']} | {r['layers']} | {status} | {r['wall_s']:.0f} | {tree} | "
                f"{r['max_process_rss_bytes'] / 2**30:.2f} | |"
            )
        else:
            lines.append(f"| {r['target']} | {r.get('layers', '')} | {r['status']} | | | | |")
    if summary:
        lines += [
            "",
            "| target | time at 40 layers s (fit) | s per layer | bundle at 40 layers + 24 blocks GB | vs Q4_K_M GGUF (7.40 GB) | peak tree slope MiB/layer | max process slope MiB/layer |",
            "|---|---|---|---|---|---|---|",
        ]
        for t, s in summary.items():
            lines.append(
                f"| {t} | {s['time_s']['at_40_layers']} | {s['time_s']['per_layer']} | "
                f"{s['bundle_bytes']['at_40_layers_24_blocks'] / 1e9:.2f} | {s['vs_gguf_q4_k_m']} | "
                f"{s['peak_bytes']['per_layer_slope'] / 2**20:.0f} | "
                f"{s['peak_bytes'].get('process_rss_per_layer_slope', 0) / 2**20:.0f} |"
            )
    svg = svg_plot(rows)
    if svg:
        (REPO / "docs" / f"{name}.svg").write_text(svg)
        lines += ["", f"![peak memory against layers]({name}.svg)"]
    lines.append("<!-- /scale-bench -->")
    replace_doc_block(lines, "<!-- scale-bench -->", "<!-- /scale-bench -->", "## Scale (9B widths)")


def replace_doc_block(lines: list[str], begin: str, end: str, heading: str) -> None:
    """Put ``lines`` (from ``begin`` to ``end`` markers) in docs/benchmarks.md in place of the block
    a previous run wrote, or under ``heading`` at the end the first time."""
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    block = "\n".join(lines) + "\n"
    if begin in text:
        a, b = text.index(begin), text.index(end) + len(end) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="xnnpack,onnx,qnn,coreml")
    ap.add_argument("--layers", default="1,2,4,8")
    ap.add_argument("--vision-depth", type=int, default=1)
    ap.add_argument("--name", default="scale")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument(
        "--timeout", type=float, default=None, help="seconds before an export is stopped and recorded as such"
    )
    ap.add_argument(
        "--summarize", action="store_true", help="only recompute the summary and docs from results/NAME.json"
    )
    args = ap.parse_args()
    if args.summarize:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        result["summary"] = summarize(result["runs"], result["vision_depth"])
        (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        write_doc(result, args.name)
        print(json.dumps(result["summary"], indent=2))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="autoglm-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = _earlier_rows(RESULTS / f"{args.name}.json", args.vision_depth, args.verify)
    for n in [int(x) for x in args.layers.split(",")]:
        ckpt = work / f"ckpt-{n}"
        write_9b_shape_checkpoint(ckpt, n, args.vision_depth)
        for spec in args.targets.split(","):
            target, _, recipe = spec.partition(":")  # "xnnpack:recipes/xnnpack-compact.yaml": another recipe
            label, tag = (f"{target} ({Path(recipe).stem})", Path(recipe).stem) if recipe else (target, target)
            print(f"N={n} {label} ...", flush=True)
            r = run_one(
                ckpt, target, work / f"bundle-{tag}-{n}", recipe, args.verify, work / f"{tag}-{n}.log", args.timeout
            )
            r["target"], r["layers"] = label, n
            rows = [x for x in rows if (x["target"], x["layers"]) != (label, n)] + [r]
            print(json.dumps({k: v for k, v in r.items() if k not in ("components", "log_tail")}), flush=True)
            shutil.rmtree(work / f"bundle-{tag}-{n}", ignore_errors=True)
            result = {
                "machine": f"{platform.machine()}, {platform.system()}, {_cores()} cores",
                "verify": args.verify,
                "vision_depth": args.vision_depth,
                "runs": rows,
                "summary": summarize(rows, args.vision_depth),
            }
            (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(ckpt, ignore_errors=True)
    write_doc(result, args.name)
    print(json.dumps(result["summary"], indent=2))


def _earlier_rows(path: Path, vision_depth: int, verify: bool) -> list[dict]:
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    same = earlier["vision_depth"] == vision_depth and earlier["verify"] == verify
    return earlier["runs"] if same else []


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
