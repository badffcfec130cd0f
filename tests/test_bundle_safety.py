"""A bundle is untrusted input (issue #29): every file a runtime opens is named relative, stays inside
the bundle and is hashed in the manifest; a malformed or tampered manifest is a one-line error
before anything loads; a bundle that failed its gates does not run silently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture
def bundle(xnnpack_bundle, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(xnnpack_bundle[0], d)
    return d


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _escape_part(b: Path, m: dict) -> str:
    outside = b.parent / "outside"
    outside.mkdir()
    shutil.copyfile(b / "model.pte", outside / "evil.pte")
    m["components"]["text_decoder"]["programs"] = [{"file": "../outside/evil.pte"}]
    return "outside the bundle"


def _absolute_part(b: Path, m: dict) -> str:
    m["components"]["text_decoder"]["programs"] = [{"file": str((b / "model.pte").resolve())}]
    return "outside the bundle"


def _unhashed_program(b: Path, m: dict) -> str:
    del m["files"]["model.pte"]
    (b / "model.pte").write_bytes(b"replaced")
    return "does not hash"


def _unhashed_tokenizer(b: Path, m: dict) -> str:
    del m["files"]["tokenizer.json"]
    return "does not hash"


def _symlinked_out(b: Path, m: dict) -> str:
    outside = b.parent / "tok.json"
    shutil.copyfile(b / "tokenizer.json", outside)
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(outside)  # same bytes, same hash: only where it resolves differs
    return "outside the bundle"


def _files_a_list(b: Path, m: dict) -> str:
    m["files"] = list(m["files"])
    return "files"


def _entry_without_bytes(b: Path, m: dict) -> str:
    del m["files"]["model.pte"]["bytes"]
    return "files.model.pte"


def _no_text_decoder(b: Path, m: dict) -> str:
    del m["components"]["text_decoder"]
    return "text_decoder"


def _huge_context(b: Path, m: dict) -> str:
    m["shapes"]["max_context"] = 1e9
    return "max_context"


def _consistent_bigger_context(b: Path, m: dict) -> str:
    # every copy in the manifest says 4096; only the program knows its cache holds 128
    m["shapes"]["max_context"] = m["recipe"]["content"]["shapes"]["max_context"] = 4096
    m["components"]["text_decoder"]["state"]["kv_cache"]["shape"][2] = 4096
    return "get_max_context_len"


def _truncated_rehashed(b: Path, m: dict) -> str:
    pte = b / "model.pte"
    pte.write_bytes(pte.read_bytes()[:5000])
    m["files"]["model.pte"] = _entry(pte)
    return "cannot load"


def _bucket_method_elsewhere(b: Path, m: dict) -> str:
    m["preprocessing"]["buckets"][1]["method"] = "text_decoder"  # an image through another component's method
    return "preprocessing.buckets[1]"


def _bundle_before_buckets(b: Path, m: dict) -> str:
    m["preprocessing"]["image_size"] = m["preprocessing"].pop("buckets")[0]["height"]
    return "preprocessing.image_size"


CASES = [
    _escape_part,
    _absolute_part,
    _unhashed_program,
    _unhashed_tokenizer,
    _symlinked_out,
    _files_a_list,
    _entry_without_bytes,
    _no_text_decoder,
    _huge_context,
    _consistent_bigger_context,
    _truncated_rehashed,
    _bucket_method_elsewhere,
    _bundle_before_buckets,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_tampered_or_malformed_bundle_is_refused_before_use(case, bundle):
    m = _manifest(bundle)
    needle = case(bundle, m)
    _write(bundle, m)
    assert_one_line_error(run_cli("run", bundle, "--prompt", "hi", "--max-new-tokens", "2"), needle)
    if case in (_escape_part, _unhashed_program, _symlinked_out, _files_a_list, _no_text_decoder):
        assert_one_line_error(run_cli("verify", bundle), needle)


def test_a_bundle_that_failed_its_gates_needs_allow_failed(bundle):
    m = _manifest(bundle)
    m["verification"] = {"passed": False, "failed": ["text_decoder/lowered_vs_reference"], "report": "report.json"}
    _write(bundle, m)
    assert_one_line_error(
        run_cli("run", bundle, "--prompt", "hi", "--max-new-tokens", "2"),
        "--allow-failed",
        "text_decoder/lowered_vs_reference",
    )
    proc = run_cli("run", bundle, "--prompt", "hi", "--max-new-tokens", "2", "--allow-failed")
    assert proc.returncode == 0, proc.stderr
    assert "warning: running a bundle that failed its parity gates" in proc.stderr


def test_opened_files_cover_every_target_manifest(xnnpack_bundle, qnn_bundle, coreml_bundle):
    """Each runtime's files are among those the check walks (the check cannot be blind to a target)."""
    from autoglm_export.bundle import load_bundle, opened_files

    for b in (xnnpack_bundle[0], qnn_bundle[0], coreml_bundle):
        m = load_bundle(b, check_hashes=False)
        named = {n for _, n in opened_files(m)}
        loaded = {p["file"] for c in m["components"].values() for p in [c, *(c.get("programs") or [])]}
        assert loaded <= named and "tokenizer.json" in named


def test_run_trusts_a_stamp_until_a_file_changes(bundle, tmp_path, monkeypatch):
    """`run` re-hashes nothing while every file keeps its identity since the last full check; any
    write moves ctime and brings the full check (and its refusal) back; `verify`'s load always hashes."""
    import os

    from autoglm_export import bundle as bundle_mod
    from autoglm_export.errors import BundleError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hashed = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    n = len(_manifest(bundle)["files"])
    bundle_mod.load_bundle(bundle, trust_stamp=True)
    assert len(hashed) == n  # first time: everything
    bundle_mod.load_bundle(bundle, trust_stamp=True)
    assert len(hashed) == n  # stamp trusted
    bundle_mod.load_bundle(bundle)
    assert len(hashed) == 2 * n  # verify's way: full hash regardless
    pte = bundle / "model.pte"
    st = pte.stat()
    data = bytearray(pte.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pte.write_bytes(bytes(data))
    os.utime(pte, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    with pytest.raises(BundleError, match="does not match its manifest hash"):
        bundle_mod.load_bundle(bundle, trust_stamp=True)
