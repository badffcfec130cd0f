"""Cost of the image buckets at the real 9B vision widths (issue #30 item 2).

The GLM-4.1V-9B ViT (24 blocks, hidden 1536; tests/data/glm41v_9b_config.json) with random
weights, one module per bucket sharing one set of parameters (as an XNNPACK program shares them),
run in PyTorch eager fp32 on this host's CPU threads, the buckets alternating (A, B, A, B ...),
median of --repeats. Reports per bucket: patches, image tokens (what the decoder prefills), and
milliseconds per image. Eager CPU time is an indication of the ratio between buckets, not of a
phone's speed.

    .venv/bin/python bench/image_buckets.py [--threads 2] [--repeats 3] [--out bench/results/image-buckets.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from autoglm_export.models.glm4v.vision import VisionEncoder  # noqa: E402
from autoglm_export.models.glm4v.spec import parse_config  # noqa: E402
from autoglm_export.recipe import DEFAULT_IMAGES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "image-buckets.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg_file = REPO / "tests" / "data" / "glm41v_9b_config.json"
    spec = parse_config(json.loads(cfg_file.read_text()), cfg_file)
    g = torch.Generator().manual_seed(0)
    mods = {}
    shared = None
    for size in DEFAULT_IMAGES:
        m = VisionEncoder(spec, size).eval()
        if shared is None:
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            shared = dict(m.named_parameters())
        else:
            for name, p in shared.items():  # the same tensors: one copy of the weights
                owner, _, leaf = name.rpartition(".")
                setattr(m.get_submodule(owner) if owner else m, leaf, p)
        with torch.no_grad():
            m.pos_embed.copy_(torch.randn(m.pos_embed.shape, generator=g) * 0.02)
        m.init_runtime_buffers()
        mods[size] = m
    assert all(mods[DEFAULT_IMAGES[1]].get_parameter(n) is p for n, p in shared.items())
    inputs = {s: m.example_inputs()[0] for s, m in mods.items()}
    times = {s: [] for s in mods}
    with torch.no_grad():
        for s, m in mods.items():  # warm-up
            m(inputs[s])
        for _ in range(a.repeats):
            for s, m in mods.items():
                t0 = time.perf_counter()
                m(inputs[s])
                times[s].append(time.perf_counter() - t0)
    rows = []
    for (h, w), m in mods.items():
        ms = statistics.median(times[(h, w)]) * 1e3
        rows.append(
            {
                "bucket": [h, w],
                "patches": m.num_patches,
                "image_tokens": m.num_tokens,
                "ms_per_image": round(ms, 1),
                "runs_ms": [round(t * 1e3, 1) for t in times[(h, w)]],
            }
        )
    base = rows[0]["ms_per_image"]
    for r in rows:
        r["time_vs_first"] = round(r["ms_per_image"] / base, 2)
    result = {
        "what": "9B-width GLM-4.1V ViT (24 blocks, hidden 1536), random weights, PyTorch eager fp32, alternating buckets",
        "threads": a.threads,
        "repeats": a.repeats,
        "load_avg_1m_at_start": os.getloadavg()[0],
        "vision_params": sum(p.numel() for p in shared.values()),
        "buckets": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['bucket'][0]}x{r['bucket'][1]}: {r['patches']} patches, {r['image_tokens']} image tokens, "
            f"{r['ms_per_image']:.0f} ms/image ({r['time_vs_first']}x)"
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
