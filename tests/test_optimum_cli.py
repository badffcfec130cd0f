"""`optimum-cli export autoglm` (issue #31, item 7): registered through optimum's
`optimum.commands.register` namespace, the same options and errors as `autoglm-export`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import assert_one_line_error

OPTIMUM_CLI = Path(sys.executable).parent / "optimum-cli"


def test_optimum_cli_lists_and_documents_the_autoglm_exporter(tmp_path):
    assert OPTIMUM_CLI.is_file(), "optimum-cli is not installed in this environment"
    listing = subprocess.run([str(OPTIMUM_CLI), "export", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert listing.returncode == 0 and "autoglm" in listing.stdout, listing.stderr[-2000:]
    usage = subprocess.run(
        [str(OPTIMUM_CLI), "export", "autoglm", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    for option in ("--target", "--checkpoint", "--out", "--recipe", "--force", "--quiet"):
        assert option in usage.stdout, option


def test_optimum_cli_export_is_the_autoglm_export(tiny_ckpt, tmp_path):
    """A user error comes back as autoglm-export's one line and exit code 2 (run from another
    directory: the plug-in is found through the installed namespace, not the repository); and an
    existing non-bundle --out is refused even with --force, as `autoglm-export` refuses it."""
    missing = subprocess.run(
        [
            str(OPTIMUM_CLI),
            "export",
            "autoglm",
            "--target",
            "xnnpack",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert_one_line_error(missing, "nope")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    refused = subprocess.run(
        [
            str(OPTIMUM_CLI),
            "export",
            "autoglm",
            "--target",
            "xnnpack",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(keep),
            "--force",
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert_one_line_error(refused, "precious")
    assert (keep / "notes.txt").read_text() == "mine"
