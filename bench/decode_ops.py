"""Where one decode step's time goes in an xnnpack bundle's decoder (issue #28; not in CI).

    python bench/decode_ops.py BUNDLE [BUNDLE ...] [--steps 20] [--threads 2] [--position 16]

Each decoder program (``text_decoder`` of ``model.pte`` or each part) is loaded with ExecuTorch's
event tracer on, its cache filled up to ``--position`` by prefill calls (random hidden states), and
called ``--steps`` times with one token at cache position ``--position`` on;
the ETDump it writes holds the runtime's own timings: each delegate call, each operator left to
the portable kernels, and each XNNPACK operator inside the delegate (the pip build profiles them).
Printed per program: the median of each event over the steps after the first three, summed by op
kind. Several bundles are measured in turns (one program of each, then the next program), so a
comparison is one run, not two. Results: bench/results/decode-ops-at<position>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def programs(bundle: Path) -> list[str]:
    m = json.loads((bundle / "manifest.json").read_text())
    dec = m["components"]["text_decoder"]
    return [p["file"] for p in dec.get("programs") or [dec]]


def profile(pte: Path, steps: int, position: int, hidden: int, chunk: int) -> dict:
    import executorch.kernels.quantized  # noqa: F401  registers embedding_4bit & co.
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import _C

    module = _C._load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    g = torch.Generator().manual_seed(0)
    for a in range(0, position, chunk):  # the cache filled up to the position, as a prompt would
        n = min(chunk, position - a)
        pos = torch.arange(a, a + n)
        module.run_method("text_decoder", (torch.randn(1, n, hidden, generator=g), pos.expand(3, n).contiguous(), pos))
    x = torch.randn(1, 1, hidden, generator=g)
    for i in range(steps):
        s = position + i
        module.run_method("text_decoder", (x, torch.full((3, 1), s), torch.tensor([s])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decode.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    kinds: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            if ev.perf_data is None:
                continue
            ms = statistics.median(ev.perf_data.raw[3:] or ev.perf_data.raw)
            kind = ("xnnpack: " if ev.is_delegated_op else "") + re.sub(r" #\d+$", "", ev.name)
            kinds[kind] += ms
            counts[kind] += 1
    return {k: {"ms": round(v, 4), "events": counts[k]} for k, v in kinds.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--position", type=int, default=16)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    files = {b: programs(b) for b in a.bundles}
    if len({len(f) for f in files.values()}) != 1:
        sys.exit("the bundles' decoders have different numbers of programs: not comparable")
    out: dict = {str(b): {} for b in a.bundles}
    for i in range(len(next(iter(files.values())))):
        for b in a.bundles:  # in turns: program i of every bundle, then program i + 1
            m = json.loads((b / "manifest.json").read_text())
            hidden, chunk = m["model"]["text"]["hidden_size"], m["shapes"]["prefill_chunk"]
            out[str(b)][files[b][i]] = prof = profile(b / files[b][i], a.steps, a.position, hidden, chunk)
            total = prof.get("Method::execute", {}).get("ms")
            print(f"{b.name} {files[b][i]}: {total} ms per call")
            for kind, v in list(prof.items())[:14]:
                print(f"  {v['ms']:8.3f} ms  x{v['events']:<3d} {kind}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"decode-ops-at{a.position}.json").write_text(
        json.dumps({"steps": a.steps, "threads": a.threads, "position": a.position, "bundles": out}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
