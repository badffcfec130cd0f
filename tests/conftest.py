"""Shared fixtures: tiny checkpoints are built once per session, in the real layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from autoglm_export.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def xnnpack_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with the xnnpack-tiny recipe: (bundle dir, completed process)."""
    out = tmp_path_factory.mktemp("xnn") / "bundle"
    proc = run_cli("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--out", out,
                   "--recipe", REPO / "recipes" / "xnnpack-tiny.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def qnn_bundle(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint exported with the qnn-tiny recipe: (bundle dir, completed process)."""
    out = tmp_path_factory.mktemp("qnn") / "bundle"
    proc = run_cli("--target", "qnn", "--checkpoint", tiny_ckpt, "--out", out,
                   "--recipe", REPO / "recipes" / "qnn-tiny.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="session")
def audio_ckpt(tmp_path_factory) -> Path:
    from autoglm_export.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("audio") / "tiny-audio", seed=1, audio=True)


@pytest.fixture(scope="session")
def audio_xnnpack_bundle(audio_ckpt, tmp_path_factory) -> Path:
    """The tiny audio checkpoint exported with the xnnpack-tiny recipe (image + audio + text)."""
    out = tmp_path_factory.mktemp("audio-xnn") / "bundle"
    proc = run_cli("-q", "--target", "xnnpack", "--checkpoint", audio_ckpt, "--out", out,
                   "--recipe", REPO / "recipes" / "xnnpack-tiny.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def coreml_bundle(audio_ckpt, tmp_path_factory) -> Path:
    """The tiny audio checkpoint exported with the coreml-tiny recipe (verified by the MIL interpreter)."""
    out = tmp_path_factory.mktemp("coreml") / "bundle"
    proc = run_cli("--target", "coreml", "--checkpoint", audio_ckpt, "--out", out,
                   "--recipe", REPO / "recipes" / "coreml-tiny.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit codes, stderr, no traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "autoglm_export.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def tree_snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))} if path.exists() else {}
