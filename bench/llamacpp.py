"""Decode, prefill and load side by side with llama.cpp on the same weights (issue #28; not in CI).

    python bench/llamacpp.py [--layers 4] [--reps 3] [--threads 2] [--work DIR] [--recipe FILE]
                             [--bundle DIR ...]   # extra bundles to measure in the same alternation
    python bench/llamacpp.py --table-only          # docs table again from bench/results/llamacpp.json

1. llama.cpp from the `llama-cpp-python` source package on PyPI (it vendors llama.cpp), built with
   cmake, CPU only: llama-bench and llama-quantize (cached under --work).
2. A synthetic checkpoint at the real 9B widths (`tiny-checkpoint --preset 9b-shape`, --layers
   decoder layers, one ViT block), converted with llama.cpp's own convert_hf_to_gguf.py. The
   converter refuses a tokenizer whose pre-tokenizer hash it does not know (the synthetic one's is
   not in its table), so the extracted copy under --work is patched to call it gpt-2 (byte-level
   BPE, the GLM-4 tokenizer's family). Quantized Q4_0, and Q4_0 with a q8_0 output matrix (the
   closest match to our int8 lm_head).
3. Our bundle exported from the same checkpoint with the CLI as users run it (verification on).
4. Both sides measured alternating in one run (bundle, GGUF, bundle, GGUF ...; median of --reps),
   text only: decode tok/s after a 16-token prompt (64 new tokens), decode tok/s with 1,500 tokens
   already in the cache, prefill tok/s for 128 tokens, load time, peak RSS, file size. Each
   measurement waits until the 1-minute load average is below 0.5 + 0.25 per running side.
   Also the machine's read bandwidth (numpy sum over 1 GiB), and each side's decode rate as a
   fraction of the bound it gives (bandwidth / weight bytes read per token).

Results: bench/results/llamacpp.json and the table in docs/benchmarks.md.
Definitions: load = opening the model until it can run (ours: `open_bundle` as `run` calls it: the
manifest checks, the hash stamp of the last full check instead of re-hashing, and the programs'
load, measured in the process after Python's imports, which are reported apart, as is the full
re-hash `verify` does; llama.cpp: wall time of `llama-bench -p 1 -n 1 -r 1` minus the compute it
reports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
from measure import write_9b_shape_checkpoint  # noqa: E402

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_cpp(work: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, built (llama-bench, llama-quantize)."""
    src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if src is None:
        log(f"downloading the {LLAMA_CPP_PYTHON} source package")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                work,
                LLAMA_CPP_PYTHON,
            ]
        )
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as t:
            safe_extract(t, work)
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build = src / "build"
    if not (build / "bin" / "llama-bench").is_file() or not (build / "bin" / "llama-quantize").is_file():
        log("building llama.cpp (cmake, CPU only)")
        run(
            [
                "cmake",
                "-S",
                src,
                "-B",
                build,
                "-DCMAKE_BUILD_TYPE=Release",
                *isa_flags(),
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_OPENSSL=OFF",
            ],
            stdout=subprocess.DEVNULL,
        )
        run(
            ["cmake", "--build", build, "-j", str(os.cpu_count()), "--target", "llama-bench", "llama-quantize"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    base = src / "conversion" / "base.py"
    text = base.read_text()
    marker = '        if res is None:\n            logger.warning("\\n")'
    if "autoglm-export bench" not in text:  # the local copy's one change: see the module docstring
        assert marker in text, "llama.cpp's get_vocab_base_pre changed: update the patch"
        base.write_text(
            text.replace(
                marker,
                "        if res is None:  # autoglm-export bench: synthetic tokenizer\n"
                '            res = "gpt-2"\n' + marker,
                1,
            )
        )
    return src


def safe_extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Extract with the "data" filter where this Python has it (3.11.4+); before that, refuse any
    member that is not a plain file or directory inside ``dest`` (what the filter would refuse)."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for m in archive.getmembers():
        target = (dest / m.name).resolve()
        if not (m.isfile() or m.isdir()) or not target.is_relative_to(root):
            sys.exit(f"{archive.name}: refusing member {m.name[:200]!r} (not a plain file inside {dest})")
    archive.extractall(dest)


def isa_flags() -> list[str]:
    """This CPU's vector extensions, without AMX: with GGML_NATIVE a build on this machine (which
    reports amx_tile) crashed (SIGSEGV) on every batch of two or more tokens in llama-bench, while
    one-token batches ran; the AVX-512 build without AMX runs every batch size."""
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()
    want = {
        "AVX": "avx",
        "AVX2": "avx2",
        "FMA": "fma",
        "F16C": "f16c",
        "AVX_VNNI": "avx_vnni",
        "AVX512": "avx512f",
        "AVX512_VBMI": "avx512vbmi",
        "AVX512_VNNI": "avx512_vnni",
        "AVX512_BF16": "avx512_bf16",
    }
    return ["-DGGML_NATIVE=OFF", *(f"-DGGML_{k}={'ON' if v in flags else 'OFF'}" for k, v in want.items())]


def checkpoint(work: Path, layers: int) -> Path:
    ckpt = work / f"ckpt-9b-shape-{layers}l"
    if not (ckpt / "config.json").is_file():
        log(f"writing the synthetic 9B-shape checkpoint ({layers} layers, 1 ViT block)")
        write_9b_shape_checkpoint(ckpt, layers, vision_depth=1, cwd=REPO)
    return ckpt


def ggufs(src: Path, ckpt: Path, work: Path) -> dict[str, Path]:
    bf16 = work / f"{ckpt.name}-bf16.gguf"
    if not bf16.is_file():
        log("converting with llama.cpp's convert_hf_to_gguf.py")
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        run(
            [sys.executable, src / "convert_hf_to_gguf.py", ckpt, "--outfile", bf16, "--outtype", "bf16"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    out = {}
    for name, extra in (("Q4_0", []), ("Q4_0+q8_0-output", ["--output-tensor-type", "q8_0"])):
        path = work / f"{ckpt.name}-{name}.gguf"
        if not path.is_file():
            log(f"llama-quantize {name}")
            run(
                [src / "build" / "bin" / "llama-quantize", *extra, bf16, path, "Q4_0"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        out[name] = path
    return out


def bundle(ckpt: Path, work: Path, recipe: Path) -> Path:
    out = work / f"bundle-{ckpt.name}-{recipe.stem}"
    if not (out / "manifest.json").is_file():
        log(f"exporting our bundle ({recipe.name}, the CLI with verification)")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                "/usr/bin/time",
                "-f",
                "%M",
                sys.executable,
                "-m",
                "autoglm_export.cli",
                "-q",
                "--target",
                "xnnpack",
                "--checkpoint",
                ckpt,
                "--out",
                out,
                "--recipe",
                recipe,
                "--force",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        # exit 1 with a bundle written: a parity gate failed (at 9B widths with random weights the
        # decoder's SQNR gate can), which changes no speed figure; it is recorded, not hidden
        if proc.returncode != 0 and not (proc.returncode == 1 and (out / "manifest.json").is_file()):
            sys.exit(f"export failed:\n{proc.stderr[-3000:]}")
        if proc.returncode:
            log(f"export exit {proc.returncode}: a parity gate failed (see {out}/report.json); measured anyway")
        peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
        (out.parent / f"{out.name}.export.json").write_text(
            json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak, "exit": proc.returncode})
        )
    return out


# runs in a process of its own (its peak RSS is its own); prints one JSON object
BUNDLE_PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from pathlib import Path
from autoglm_export.bundle import load_bundle
from autoglm_export.opened_bundle import open_bundle
imports = time.perf_counter() - t0
torch.set_num_threads(int(sys.argv[2]))
t0 = time.perf_counter()
load_bundle(Path(sys.argv[1]))  # what `verify` does: every file hashed (and the stamp `run` trusts written)
full_check = time.perf_counter() - t0
t0 = time.perf_counter()
manifest, rt, tok, pre = open_bundle(Path(sys.argv[1]), trust_stamp=True)  # what `run` does
load = time.perf_counter() - t0
V = manifest["model"]["text"]["vocab_size"]
g = torch.Generator().manual_seed(0)

def call(ids, start):
    T = len(ids)
    emb = rt.token_embedding(torch.tensor([ids]))
    pos = torch.arange(start, start + T).expand(3, T).contiguous()
    return rt.text_decoder(emb, pos, torch.arange(start, start + T))

def prefill(n):
    ids = torch.randint(0, V, (n,), generator=g).tolist()
    for a in range(0, n, rt.prefill_chunk):
        logits = call(ids[a:a + rt.prefill_chunk], a)
    return int(logits.reshape(-1).argmax())

def decode(start, n):
    tok, t0 = prefill(start), time.perf_counter()
    for i in range(n):
        tok = int(call([tok], start + i).reshape(-1).argmax())
    return n / (time.perf_counter() - t0)

t0 = time.perf_counter()
first = prefill(1)
first_token = time.perf_counter() - t0
t0 = time.perf_counter()
prefill(128)
pp = 128 / (time.perf_counter() - t0)
out = {"imports_s": imports, "full_hash_check_s": full_check, "load_s": load, "first_call_s": first_token, "prefill128_tok_s": pp,
       "decode_at16_tok_s": decode(16, 64), "decode_at1500_tok_s": decode(1500, 64),
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
print(json.dumps(out))
"""


def measure_bundle(path: Path, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", BUNDLE_PROBE, str(path), str(threads)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_gguf(src: Path, path: Path, threads: int) -> dict:
    bench = src / "build" / "bin" / "llama-bench"
    common = ["-m", path, "-t", threads, "-r", 1, "-o", "json"]

    def bench_json(*args) -> tuple[list, float, int]:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", bench, *map(str, common), *map(str, args)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(proc.stdout), time.perf_counter() - t0, int(proc.stderr.strip().splitlines()[-1]) * 1024

    rows, wall, rss1 = bench_json("-p", 1, "-n", 1)
    compute = sum(r["avg_ns"] for r in rows) / 1e9
    pp, _, rss2 = bench_json("-p", 128, "-n", 0)
    tg16, _, rss3 = bench_json("-p", 0, "-n", 64, "-d", 16)
    tg1500, _, rss4 = bench_json("-p", 0, "-n", 64, "-d", 1500)
    return {
        "load_s": wall - compute,
        "prefill128_tok_s": pp[0]["avg_ts"],
        "decode_at16_tok_s": tg16[0]["avg_ts"],
        "decode_at1500_tok_s": tg1500[0]["avg_ts"],
        "peak_rss_bytes": max(rss1, rss2, rss3, rss4),
    }


def wait_quiet(limit: float) -> float:
    load = os.getloadavg()[0]
    waited = 0
    while load > limit and waited < 600:
        time.sleep(10)
        waited += 10
        load = os.getloadavg()[0]
    return load


def read_bandwidth(threads: int) -> float:
    """Bytes per second of a streaming read on ``threads`` threads (torch's parallel sum over a 1 GiB
    float32 tensor), best of 5. A one-thread numpy sum measured 14.5 GB/s here, under what two
    decoding threads draw."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def decode_bytes_bundle(path: Path) -> int:
    """Weight bytes a decode step reads: every decoder program (layers, norm, lm_head); the token
    embedding is one gathered row."""
    m = json.loads((path / "manifest.json").read_text())
    dec = m["components"]["text_decoder"]
    files = [p["file"] for p in dec.get("programs") or [dec]]
    return sum(m["files"][f]["bytes"] for f in files)


def decode_bytes_gguf(src: Path, path: Path) -> int:
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if not t.name.startswith("token_embd"))


def main() -> None:
    if sys.argv[1:] == ["--table-only"]:  # rewrite the docs table from bench/results/llamacpp.json
        write_doc(json.loads((RESULTS / "llamacpp.json").read_text()))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/autoglm-llamacpp"))
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "xnnpack.yaml")
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="another bundle of the same checkpoint")
    ap.add_argument("--name", default="llamacpp")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = llama_cpp(a.work)
    ckpt = checkpoint(a.work, a.layers)
    models = ggufs(src, ckpt, a.work)
    ours = {f"bundle:{a.recipe.stem}": bundle(ckpt, a.work, a.recipe)}
    ours.update({f"bundle:{p.name}": p for p in a.bundle})
    sides = [*ours.items(), *models.items()]
    samples: dict[str, list[dict]] = {name: [] for name, _ in sides}
    for rep in range(a.reps):
        for name, path in sides:  # alternating: every side once per rep
            load = wait_quiet(0.5 + 0.25 * a.threads)
            log(f"rep {rep + 1}/{a.reps}: {name} (load average {load:.2f})")
            m = measure_bundle(path, a.threads) if name.startswith("bundle:") else measure_gguf(src, path, a.threads)
            m["load_average_before"] = load
            samples[name].append(m)
            log("  " + ", ".join(f"{k} {v:.3g}" for k, v in m.items()))
    bandwidth = read_bandwidth(a.threads)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": a.threads,
        "layers": a.layers,
        "reps": a.reps,
        "read_bandwidth_bytes_s": bandwidth,
        "sides": {},
    }
    for name, path in sides:
        med = {k: statistics.median(s[k] for s in samples[name]) for k in samples[name][0]}
        is_bundle = name.startswith("bundle:")
        size = (
            sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            if is_bundle
            else Path(path).stat().st_size
        )
        per_token = decode_bytes_bundle(path) if is_bundle else decode_bytes_gguf(src, path)
        med.update(
            {
                "file_bytes": size,
                "decode_weight_bytes": per_token,
                "decode_bound_tok_s": bandwidth / per_token,
                "fraction_of_bound_at16": med["decode_at16_tok_s"] / (bandwidth / per_token),
            }
        )
        if is_bundle and (path.parent / f"{path.name}.export.json").is_file():
            med["export"] = json.loads((path.parent / f"{path.name}.export.json").read_text())
        result["sides"][name] = {"median": med, "samples": samples[name]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result)
    print(json.dumps({k: v["median"] for k, v in result["sides"].items()}, indent=2))


def write_doc(result: dict) -> None:
    sides = result["sides"]
    ref = sides.get("Q4_0+q8_0-output", next(iter(sides.values())))["median"]
    rows = []
    for name, s in sides.items():
        m = s["median"]
        ratio = lambda k: f"{m[k]:.1f} ({m[k] / ref[k]:.2f}×)"  # noqa: E731
        first = f"{m['first_call_s']:.2f}" if "first_call_s" in m else "—"
        rows.append(
            f"| {name} | {ratio('decode_at16_tok_s')} | {ratio('decode_at1500_tok_s')} | {ratio('prefill128_tok_s')} | "
            f"{m['load_s']:.2f} | {first} | "
            f"{m['peak_rss_bytes'] / 2**30:.2f} | {m['file_bytes'] / 1e9:.2f} | "
            f"{m['fraction_of_bound_at16']:.2f} |"
        )
    table = "\n".join(
        [
            "<!-- llamacpp-bench -->",
            f"Written by `bench/llamacpp.py`: synthetic 9B-width checkpoint with {result['layers']} decoder layers, text only, "
            f"{result['threads']} threads, {result['machine']}, sides alternating, median of {result['reps']}; read bandwidth "
            f"{result['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s. Ratios against llama.cpp Q4_0 with a q8_0 output matrix. "
            "First call: our first one-token call, which loads the decoder's methods (XNNPACK packs their "
            "weights then); llama.cpp's warm-up run is inside its load.",
            "",
            "| side | decode tok/s at 16 | decode tok/s at 1,500 | prefill tok/s (128) | load s | first call s | peak RSS GiB | files GB | decode / bandwidth bound |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "<!-- /llamacpp-bench -->",
        ]
    )
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text()
    if "<!-- llamacpp-bench -->" in text:
        text = re.sub(r"<!-- llamacpp-bench -->.*<!-- /llamacpp-bench -->", lambda _: table, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Against llama.cpp (decode, prefill, load)\n\n" + table + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
