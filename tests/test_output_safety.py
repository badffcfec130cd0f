"""Outputs (issue #29): --force replaces bundles and nothing else, no --out may hold the inputs, a
killed run's leftovers are cleaned or undone, a full or read-only file system is a one-line error."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, run_cli, tree_snapshot


@pytest.mark.parametrize("where", ["checkpoint", "parent", "grandparent"])
def test_force_never_deletes_the_checkpoint(where, ckpt_copy):
    out = {"checkpoint": ckpt_copy, "parent": ckpt_copy.parent, "grandparent": ckpt_copy.parent.parent}[where]
    before = tree_snapshot(ckpt_copy.parent.parent)
    proc = run_cli("--target", "xnnpack", "--checkpoint", ckpt_copy, "--out", out, "--force")
    assert_one_line_error(proc, "--out", "checkpoint")
    assert tree_snapshot(ckpt_copy.parent.parent) == before


def test_force_never_deletes_the_recipe(tiny_ckpt, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe = recipes / "mine.yaml"
    recipe.write_text((REPO / "recipes" / "xnnpack-tiny.yaml").read_text())
    proc = run_cli("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--recipe", recipe, "--out", recipes, "--force")
    assert_one_line_error(proc, "--out")
    assert recipe.is_file()


def test_force_replaces_only_an_earlier_bundle(tiny_ckpt, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not a bundle")
    proc = run_cli("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--out", out, "--force")
    assert_one_line_error(proc, "not an earlier output", str(out))
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 not a bundle"
    # tiny-checkpoint --force replaces only a checkpoint that command wrote
    proc = run_cli("tiny-checkpoint", out, "--force")
    assert_one_line_error(proc, "not an earlier output")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_check_output_rules(tmp_path):
    from autoglm_export.errors import ExportError
    from autoglm_export.fsutil import check_output

    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, force=True)  # an empty directory may be replaced
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"format": "autoglm-export bundle", "schema_version": 1}))
    check_output(bundle, force=True)
    with pytest.raises(ExportError, match="already exists"):
        check_output(bundle, force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        check_output(tmp_path / "file", force=True)
    link = tmp_path / "link"
    link.symlink_to(bundle)
    with pytest.raises(ExportError, match="not a directory"):
        check_output(link, force=True)
    ckpt = tmp_path / "a" / "ckpt"
    ckpt.mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path / "a")  # the checkpoint's parent, reached through a symlink
    with pytest.raises(ExportError, match="contain an input"):
        check_output(alias, force=True, protected=(ckpt,))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_leftovers_are_cleaned_or_undone(tmp_path):
    from autoglm_export.fsutil import atomic_output_dir

    out = tmp_path / "bundle"
    dead = _dead_pid()
    stale = tmp_path / f".bundle.tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "half.pte").write_bytes(b"x" * 10)
    # a swap cut between its renames: the old bundle hidden, the destination absent
    old = tmp_path / f".bundle.old-{dead}-89abcdef"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "autoglm-export bundle"}))
    notes = []
    with pytest.raises(Exception, match="already exists"):
        with atomic_output_dir(out, on_note=notes.append):
            pass
    assert (out / "manifest.json").is_file(), "the hidden old bundle must be put back"
    assert not stale.exists() and not old.exists()
    assert len(notes) == 2 and any("restored" in n for n in notes)


def test_ctrl_c_between_the_renames_leaves_a_bundle(tmp_path, monkeypatch):
    from autoglm_export import fsutil

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "autoglm-export bundle", "v": "old"}))
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(a, b):
        real_replace(a, b)
        calls.append(b)
        if len(calls) == 1:  # right after the old bundle was moved aside
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(fsutil.os, "replace", replace_then_interrupt)
    # Ctrl-C raises KeyboardInterrupt as in the CLI (main() installs it): an xdist worker may hold
    # another handler, depending on which tests ran in it before
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with fsutil.atomic_output_dir(out, force=True) as tmp:
                (tmp / "manifest.json").write_text(json.dumps({"format": "autoglm-export bundle", "v": "new"}))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert json.loads((out / "manifest.json").read_text())["v"] == "new"
    assert fsutil.completed[-1] == out
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_full_file_system_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"

    def limit():  # writes past 64 KiB fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "autoglm_export.cli", "tiny-checkpoint", str(out), "-q"],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=limit,
        timeout=300,
    )
    assert_one_line_error(proc, "cannot write the output", "--out")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_one_line(tiny_ckpt):
    proc = run_cli("--target", "xnnpack", "--checkpoint", tiny_ckpt, "--out", "/proc/autoglm-test/bundle")
    assert_one_line_error(proc, "cannot write the output")
