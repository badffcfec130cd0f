"""Shared fixtures: tiny checkpoints are built once per session, in the real layout.

The suite runs on pytest-xdist workers (`-n 2 --dist loadfile`). Fixtures that several test files
use (checkpoints, bundles) are built once per run, not once per worker: the first worker that needs
one builds it under a file lock in the run's shared temporary directory, the others wait and reuse
it (the pattern pytest-xdist documents for session fixtures)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

# Files that take longest go first so that the two workers finish together (loadfile hands out
# files in collection order).
SLOW_FIRST = [
    "test_qnn_bundle.py",
    "test_app_ports.py",
    "test_audio.py",
    "test_xnnpack_bundle.py",
    "test_memory_guard.py",
    "test_coreml_bundle.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


# Bundles that tests in several files share, with their build times here (s, CLI export with
# verification on the 2-core CI machine). Each worker builds its share before its first test, the
# longest first: built on demand, a worker whose file needed a bundle the other worker was building
# sat idle until it was done (93 s and 59 s in one run, ~250 idle core-seconds in all).
PREBUILT = {
    "audio_xnnpack_bundle": 100,
    "qnn_shared_audio_bundle": 100,
    "qnn_bundle": 77,
    "xnnpack_bundle": 54,
    "xnnpack_ptd_bundle": 45,
    "coreml_bundle": 25,
}


@pytest.fixture(scope="session", autouse=True)
def _prebuilt_shared_bundles(request):
    """This worker's share of the ``PREBUILT`` bundles the collected tests use (all of them, on one worker)."""
    used = set().union(*(item.fixturenames for item in request.session.items))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    me = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    load = [0] * workers
    for name in sorted((n for n in PREBUILT if n in used), key=PREBUILT.get, reverse=True):
        worker = load.index(min(load))  # longest first, to the least loaded worker: the same split on every worker
        load[worker] += PREBUILT[name]
        if worker == me:
            try:
                request.getfixturevalue(name)
            except (Exception, pytest.fail.Exception, pytest.skip.Exception):
                pass  # pytest keeps the failure: the tests that use this bundle fail with it, not every test here


def _shared(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(path)` once per test run across xdist workers; a failed build is retried by the next user."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, common to every worker
    path, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


def _cli_bundle(tmp_path_factory, name: str, *args) -> tuple[Path, subprocess.CompletedProcess]:
    """An export through the real CLI, shared; its process output is kept for the tests that read it."""

    def build(path: Path) -> None:
        path.mkdir()
        proc = run_cli(*args, "--out", path / "bundle")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (path / "process.json").write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))

    path = _shared(tmp_path_factory, name, build)
    logged = json.loads((path / "process.json").read_text())
    return path / "bundle", subprocess.CompletedProcess(args, 0, logged["stdout"], logged["stderr"])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from autoglm_export.tiny import write_tiny_checkpoint

    return _shared(tmp_path_factory, "ckpt", lambda p: write_tiny_checkpoint(p, seed=0))


@pytest.fixture(scope="session")
def xnnpack_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with the xnnpack-tiny recipe: (bundle dir, completed process)."""
    return _cli_bundle(
        tmp_path_factory,
        "xnnpack",
        "--target",
        "xnnpack",
        "--checkpoint",
        tiny_ckpt,
        "--recipe",
        REPO / "recipes" / "xnnpack-tiny.yaml",
    )


@pytest.fixture(scope="session")
def qnn_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with the qnn-tiny recipe: (bundle dir, completed process)."""
    return _cli_bundle(
        tmp_path_factory,
        "qnn",
        "--target",
        "qnn",
        "--checkpoint",
        tiny_ckpt,
        "--recipe",
        REPO / "recipes" / "qnn-tiny.yaml",
    )


@pytest.fixture(scope="session")
def audio_ckpt(tmp_path_factory) -> Path:
    from autoglm_export.tiny import write_tiny_checkpoint

    return _shared(tmp_path_factory, "audio-ckpt", lambda p: write_tiny_checkpoint(p, seed=1, audio=True))


def _write_shared_weights_recipe(path: Path) -> None:
    """qnn-tiny with qnn.weight_sharing on, the decoder in one program, and smaller contexts (50000 B:
    the decoder in two, its layers' one weight copy and the head; the audio encoder in four, its last
    unit taking 49,664 B)."""
    path.mkdir()
    text = recipe_text(REPO / "recipes" / "qnn-tiny.yaml")
    for old, new in (
        ("name: qnn-tiny", "name: qnn-tiny-shared"),
        ("weight_sharing: false", "weight_sharing: true"),
        ("decoder_layers_per_program: 1", "decoder_layers_per_program: null"),
        ("max_context_bytes: 80000", "max_context_bytes: 50000"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    (path / "qnn-tiny-shared.yaml").write_text(one_bucket(text))  # buckets: the qnn_bundle fixture


@pytest.fixture(scope="session")
def qnn_shared_audio_bundle(audio_ckpt, tmp_path_factory):
    """The tiny audio checkpoint exported for qnn with weight sharing (verified on an unshared twin,
    which the emulator can load): the weight-sharing test and the qnn audio test read it, so the
    suite lowers the audio checkpoint for qnn once. (bundle dir, completed process)"""
    recipe = _shared(tmp_path_factory, "qnn-shared-recipe", _write_shared_weights_recipe) / "qnn-tiny-shared.yaml"
    return _cli_bundle(
        tmp_path_factory, "qnn-shared-audio", "--target", "qnn", "--checkpoint", audio_ckpt, "--recipe", recipe
    )


def _write_parts_recipe(path: Path) -> None:
    path.mkdir()
    text = (
        (REPO / "recipes" / "xnnpack-tiny.yaml").read_text().replace("name: xnnpack-tiny", "name: xnnpack-tiny-parts")
    )
    (path / "xnnpack-tiny-parts.yaml").write_text(text + "lowering:\n  decoder_layers_per_program: 1\n")


def _write_external_weights_recipe(path: Path) -> None:
    path.mkdir()
    text = (REPO / "recipes" / "xnnpack-tiny.yaml").read_text().replace("name: xnnpack-tiny", "name: xnnpack-tiny-ptd")
    (path / "xnnpack-tiny-ptd.yaml").write_text(  # buckets: the xnnpack_bundle fixture
        one_bucket(text) + "lowering:\n  decoder_layers_per_program: 1\n  external_weights: true\n"
    )


@pytest.fixture(scope="session")
def xnnpack_ptd_recipe(tmp_path_factory) -> Path:
    """xnnpack-tiny with the decoder in parts of one layer and every program's weights in a .ptd."""
    return _shared(tmp_path_factory, "ptd-recipe", _write_external_weights_recipe) / "xnnpack-tiny-ptd.yaml"


@pytest.fixture(scope="session")
def xnnpack_ptd_bundle(tiny_ckpt, xnnpack_ptd_recipe, tmp_path_factory) -> Path:
    """The tiny checkpoint exported with ``xnnpack_ptd_recipe`` (verified)."""
    return _cli_bundle(
        tmp_path_factory,
        "xnnpack-ptd",
        "--target",
        "xnnpack",
        "--checkpoint",
        tiny_ckpt,
        "--recipe",
        xnnpack_ptd_recipe,
    )[0]


@pytest.fixture(scope="session")
def audio_xnnpack_bundle(audio_ckpt, tmp_path_factory) -> Path:
    """The tiny audio checkpoint exported with the xnnpack-tiny recipe (image + audio + text), its
    decoder lowered in parts of one layer (recipe ``lowering``): the golden vectors, the apps'
    manifest contract and the audio tests all run through the chained parts."""
    recipe = _shared(tmp_path_factory, "parts-recipe", _write_parts_recipe) / "xnnpack-tiny-parts.yaml"
    return _cli_bundle(
        tmp_path_factory, "audio-xnnpack", "-q", "--target", "xnnpack", "--checkpoint", audio_ckpt, "--recipe", recipe
    )[0]


@pytest.fixture(scope="session")
def coreml_bundle(audio_ckpt, tmp_path_factory) -> Path:
    """The tiny audio checkpoint exported with the coreml-tiny recipe (verified by the MIL interpreter)."""
    return _cli_bundle(
        tmp_path_factory,
        "coreml",
        "--target",
        "coreml",
        "--checkpoint",
        audio_ckpt,
        "--recipe",
        REPO / "recipes" / "coreml-tiny.yaml",
    )[0]


def write_transformers_checkpoint(out: Path) -> Path:
    """Written by transformers' own save_pretrained: 1 KV head, head_dim 24, vocab 509, MLP width 200
    (no int4 group of 32 divides it), fp32 shards: the foundation tests' reference checkpoint, which
    every target's export is also tested on."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from autoglm_export.tiny import build_tokenizer, special_base
    from reference import scale_random_init

    vocab = 509
    base = special_base(vocab, False)
    cfg = Glm4vConfig(
        text_config=dict(
            hidden_size=72,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=1,
            intermediate_size=200,
            vocab_size=vocab,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 2, 2],
            },
        ),
        vision_config=dict(
            depth=1, hidden_size=48, num_heads=3, image_size=84, out_hidden_size=72, intermediate_size=80
        ),
        image_token_id=base + 14,
        image_start_token_id=base + 10,
        image_end_token_id=base + 11,
        video_token_id=base + 15,
        video_start_token_id=base + 12,
        video_end_token_id=base + 13,
    )
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(cfg).eval()
    scale_random_init(model)
    model.save_pretrained(out, max_shard_size="200KB")
    (out / "tokenizer.json").write_text(build_tokenizer(vocab, False))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [base, base + 7, base + 9]}))
    return out


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path) -> Path:
    """A copy of the tiny checkpoint a test may damage (two levels under tmp_path, so that its
    parent and grandparent are the test's own directories too)."""
    d = tmp_path / "work" / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


@pytest.fixture(scope="session")
def odd_shapes_ckpt(tmp_path_factory) -> Path:
    return _shared(tmp_path_factory, "odd-ckpt", write_transformers_checkpoint)


def recipe_text(path: Path) -> str:
    """A recipe's text for a copy written elsewhere: its calibration files (which resolve against
    the recipe's own directory) named by absolute path."""
    return Path(path).read_text().replace("calibration/", f"{Path(path).parent / 'calibration'}/")


def one_bucket(text: str) -> str:
    """A tiny recipe's text with its square image bucket only, for exports that test something else:
    each further bucket is one more vision method to lower and verify (seconds to tens of seconds per
    export here), and the per-target bundle fixtures and tests already cover two buckets."""
    out = re.sub(r"^  images: .*$", "  image_size: 112", text, count=1, flags=re.M)
    assert out != text, "no images line in this recipe"
    return out


def one_bucket_recipe(src: Path, dst: Path) -> Path:
    dst.write_text(one_bucket(Path(src).read_text()))
    return dst


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit codes, stderr, no traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "autoglm_export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def assert_one_line_error(proc, *needles: str, code: int = 2) -> str:
    """A user mistake: exit code 2 (by default), one line on stderr, no traceback, each needle named."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, (n, err)
    return err


def tree_snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}
