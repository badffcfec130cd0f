"""Peak memory of the export command as users run it, stage by stage (issue #28 item 4).

    python bench/export_memory.py --checkpoint CKPT [--target xnnpack] [--recipe FILE] [--name NAME]

Runs ``autoglm-export --target T --checkpoint CKPT --out TMP`` (verification on, the CLI's
progress lines kept), samples the process's resident memory every 0.2 s from /proc, and
attributes each sample to the progress line printed before it. Prints the largest RSS of every
progress line that held a new maximum, the overall peak (``ru_maxrss``, the kernel's own figure),
and writes bench/results/NAME.json. Without --checkpoint a 9B-width checkpoint with --layers
decoder layers and one ViT block is written to --work (as bench/llamacpp.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from measure import write_9b_shape_checkpoint  # noqa: E402

RESULTS = REPO / "bench" / "results"


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def checkpoint(work: Path, layers: int) -> Path:
    ckpt = work / f"ckpt-9b-shape-{layers}l"
    if not (ckpt / "config.json").is_file():
        write_9b_shape_checkpoint(ckpt, layers, vision_depth=1, cwd=REPO)
    return ckpt


def run(cmd: list[str], interval: float = 0.2) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    stages: list[dict] = [{"line": "(start)", "t_s": 0.0, "max_rss": 0}]
    lock = threading.Lock()

    def sample():
        while proc.poll() is None:
            r = rss_bytes(proc.pid)
            with lock:
                stages[-1]["max_rss"] = max(stages[-1]["max_rss"], r)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        with lock:
            stages.append(
                {"line": line[:160], "t_s": round(time.perf_counter() - t0, 1), "max_rss": rss_bytes(proc.pid)}
            )
        print(f"{time.perf_counter() - t0:7.1f}s {line[:140]}", flush=True)
    proc.wait()
    sampler.join()
    wall = time.perf_counter() - t0
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "stages": stages,
        "tail": tail,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/autoglm-export-memory"))
    ap.add_argument("--target", default="xnnpack")
    ap.add_argument("--recipe", type=Path)
    ap.add_argument("--name", help="results file name (default export-memory-TARGET-LAYERSl)")
    a = ap.parse_args()
    ckpt = a.checkpoint or checkpoint(a.work, a.layers)
    out = a.work / f"bundle-{a.target}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "autoglm_export.cli",
        "--target",
        a.target,
        "--checkpoint",
        str(ckpt),
        "--out",
        str(out),
    ]
    if a.recipe:
        cmd += ["--recipe", str(a.recipe)]
    load = os.getloadavg()[0]
    res = run(cmd)
    shutil.rmtree(out, ignore_errors=True)
    layers = json.loads((ckpt / "config.json").read_text()).get("text_config", {}).get("num_hidden_layers")
    res.update({"command": " ".join(cmd[1:]), "checkpoint_layers": layers, "load_avg_at_start": round(load, 2)})
    best = 0
    print("\nstage lines that set a new peak (RSS sampled every 0.2 s):")
    for s in res["stages"]:
        if s["max_rss"] > best:
            best = s["max_rss"]
            print(f"  {s['t_s']:7.1f}s {s['max_rss'] / 2**30:6.2f} GiB  {s['line'][:110]}")
    print(f"exit {res['rc']}, wall {res['wall_s']} s, peak RSS (ru_maxrss) {res['peak_rss_bytes'] / 2**30:.2f} GiB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = a.name or f"export-memory-{a.target}-{layers}l"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
