"""Memory of the qnn verification's reference stage, without the emulator (issue #28 item 4).

    python bench/qnn_reference_memory.py --bundle QNN_BUNDLE --checkpoint CKPT [--tokens 4] [--plain]
        [--name NAME]

Builds the PT2E reference of every component of a qnn bundle exactly as ``verify`` does
(``load_reference``, registry order), runs each component on the golden case's probe inputs and a
greedy run of --tokens tokens, and samples this process's RSS every 0.1 s per stage. At 9B widths
the bundle side of the same verification runs on the x86 HTP emulator for hours; this measures the
half of it that is PyTorch. ``--plain`` builds the references as before ``targets/qnn/simulation.py``
(whole-matrix dequantization on every call, a copy of the codes per graph, PT2E's caches kept) for
a before/after in one checkout. Writes bench/results/NAME.json.

Make the bundle with the library's ``export(..., verify=False)`` (the CLI always verifies), e.g. on
bench/export_memory.py's 9B-width checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--plain", action="store_true", help="the references as before the lean simulation")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()

    import torch

    from autoglm_export import verify as V
    from autoglm_export.bundle import load_bundle
    from autoglm_export.checkpoint import open_checkpoint
    from autoglm_export.host.generate import EagerRuntime, generate
    from autoglm_export.recipe import parse_recipe
    from autoglm_export.targets import get_target
    from autoglm_export.targets.qnn import target as qnn
    from autoglm_export.targets.shared.fx_provenance import share_node_provenance

    if a.plain:
        qnn.lean_simulation = lambda gm, pool: gm
        qnn.release_export_caches = lambda: None

    stages: list[dict] = []
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        stages.append({"stage": name, "t_s": round(time.perf_counter() - t0, 1), "rss_at_start": round(rss_gib(), 2)})
        stages[-1]["peak_rss"] = stages[-1]["rss_at_start"]
        print(f"[{stages[-1]['t_s']:7.1f}s rss {stages[-1]['rss_at_start']:6.2f} GiB] {name}", flush=True)

    def sample() -> None:
        while True:
            if stages:
                stages[-1]["peak_rss"] = max(stages[-1]["peak_rss"], round(rss_gib(), 2))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    stage("setup")
    share_node_provenance()
    bundle = a.bundle
    manifest = load_bundle(bundle)
    if manifest["target"] != "qnn":
        sys.exit(f"{bundle}: target {manifest['target']!r}, expected a qnn bundle")
    tgt = get_target("qnn")
    recipe = parse_recipe(manifest["recipe"]["content"], bundle / "manifest.json")
    ckpt = open_checkpoint(a.checkpoint)
    shapes, plans, pre = V.configure_for_bundle(tgt, bundle, manifest, recipe, ckpt)
    case = V.GoldenCase(ckpt, pre, shapes)
    q = {}
    for name in plans:
        stage(f"reference {name}")
        q[name] = V.load_reference(ckpt, name, shapes, plans[name], tgt, bundle, manifest)
        V.release_memory()
    stage("held")
    qrt = EagerRuntime(q, shapes.max_context, shapes.prefill_chunk)
    with torch.no_grad():
        for name in case.inputs:
            stage(f"run {name}")
            for x in case.inputs[name]:
                q[name](x)
        stage(f"greedy {a.tokens} tokens")
        trace = generate(qrt, case.prompt, **case.media, max_new_tokens=a.tokens)
    stage("end")
    result = {
        "bundle": str(bundle),
        "checkpoint": str(a.checkpoint),
        "plain": a.plain,
        "tokens": trace.tokens,
        "stages": stages,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}))
    if a.name:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
