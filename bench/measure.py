"""Peak memory and wall time of a command, from the kernel's own accounting.

* ``tree_peak_bytes``: the high-water mark of a memory cgroup holding the command and everything
  it starts (cgroup v2 ``memory.peak``, or v1 ``memory.max_usage_in_bytes``). It counts anonymous
  memory plus the page cache the tree charged (shards read, files written), so it is an upper
  bound on the tree's RSS. ``None`` where no memory cgroup can be created (not root, no
  controller).
* ``max_process_rss_bytes``: ``ru_maxrss`` of the largest single process of the tree (anonymous
  plus mapped file pages), from ``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

_V1 = Path("/sys/fs/cgroup/memory")
_V2 = Path("/sys/fs/cgroup")


def _new_cgroup() -> tuple[Path, str] | None:
    name = f"autoglm-bench-{os.getpid()}-{time.monotonic_ns()}"
    for root, peak in ((_V1, "memory.max_usage_in_bytes"), (_V2, "memory.peak")):
        if (root / "cgroup.procs").is_file() and ((root / "memory.stat").is_file() or root == _V2):
            try:
                d = root / name
                d.mkdir()
            except OSError:
                continue
            if (d / peak).is_file():
                return d, peak
            d.rmdir()
    return None


_WRAPPER = (
    "import resource, subprocess, sys, json\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def measure(cmd: list[str], *, env: dict | None = None, log: Path | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd``; return its exit code, wall time and peak memory figures. After ``timeout``
    seconds the whole tree is killed and ``timed_out`` is true."""
    import signal
    import tempfile

    group = _new_cgroup()
    timed_out = False
    with tempfile.NamedTemporaryFile("r", suffix=".json") as res:

        def enter():  # runs in the child before exec: the whole tree is charged to the group
            os.setsid()  # and is one process group, so a timeout stops all of it
            if group:
                (group[0] / "cgroup.procs").write_text(str(os.getpid()))

        out = open(log, "w") if log else subprocess.DEVNULL
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WRAPPER, res.name, *cmd],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=enter,
            )
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            if log:
                out.close()
        wall = time.perf_counter() - t0
        data = json.loads(Path(res.name).read_text() or "{}")
    tree = None
    if group:
        tree = int((group[0] / group[1]).read_text())
        try:
            group[0].rmdir()
        except OSError:
            pass
    return {
        "rc": data.get("rc", -1),
        "wall_s": round(wall, 2),
        "tree_peak_bytes": tree,
        "max_process_rss_bytes": data.get("maxrss_kib", 0) * 1024,
        "timed_out": timed_out,
    }


if __name__ == "__main__":  # python bench/measure.py CMD...: prints the figures as JSON
    print(json.dumps(measure(sys.argv[1:]), indent=2))


def write_9b_shape_checkpoint(ckpt: Path, layers: int, vision_depth: int, *, cwd: Path | None = None) -> Path:
    """A synthetic checkpoint at GLM-4.1V-9B's widths (random weights, ``layers`` decoder layers,
    ``vision_depth`` ViT blocks), written by the CLI in a process of its own so that its memory is
    not the caller's."""
    cmd = [sys.executable, "-m", "autoglm_export.cli", "tiny-checkpoint", str(ckpt), "--preset", "9b-shape"]
    cmd += ["--layers", str(layers), "--vision-depth", str(vision_depth), "-q", "--force"]
    subprocess.run(cmd, cwd=cwd, check=True)
    return ckpt
