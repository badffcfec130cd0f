"""Bundle layout and manifest: what an app or the host runner needs to use the exported model.

``manifest.json`` lists every file with its size and sha256; ``load_bundle`` checks them all
before anything is loaded, so a corrupted or tampered bundle is refused with a one-line error.
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import __version__
from .errors import BundleError
from .fsutil import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
PROMPT_TEMPLATE = ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|>×N<|end_of_image|>"
                   "[<|begin_of_audio|><|audio|>×M<|end_of_audio|>]TEXT<|assistant|>\n")


def library_versions(extra: dict | None = None) -> dict:
    out = {"autoglm-export": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out.update(extra or {})
    return dict(sorted(out.items()))


def file_entries(bundle: Path, names: list[str]) -> dict:
    return {n: {"bytes": (bundle / n).stat().st_size, "sha256": sha256_file(bundle / n)} for n in sorted(names)}


def part_file(name: str, layers: tuple[int, int], ext: str) -> str:
    """File of one decoder part, layers [a, b): ``text_decoder.00-01.pte``, the same for every target."""
    a, b = layers
    return f"{name}.{a:02d}-{b - 1:02d}.{ext}"


def decoder_part_paths(bundle: Path, manifest: dict) -> list[Path]:
    """The decoder's part files in layer order; empty when the decoder is one program."""
    return [Path(bundle) / p["file"] for p in manifest["components"]["text_decoder"].get("programs") or []]


def program_data_files(bundle: Path, manifest: dict) -> dict[Path, Path]:
    """Each program file that keeps its weights in a ``.ptd`` (recipe ``lowering.external_weights``)
    mapped to that data file. A data file must be one the manifest lists (so its hash was checked)."""
    out = {}
    for name, comp in manifest["components"].items():
        for entry in [comp, *(comp.get("programs") or [])]:
            data = entry.get("data_file")
            if data is None:
                continue
            if data not in manifest["files"] or not _safe_relative(data):
                raise BundleError("data file not listed in the manifest's files", file=Path(bundle) / MANIFEST,
                                  field=f"components.{name}.data_file", got=repr(data), fix="re-export the bundle with autoglm-export")  # fmt: skip
            out[Path(bundle) / entry["file"]] = Path(bundle) / data
    return out


def _safe_relative(name: str) -> bool:
    """A manifest file name stays inside the bundle: plain names, or paths inside a package
    directory (Core ML ``.mlpackage``), never absolute, hidden or with ``..``."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p and not p.startswith(".") for p in parts) and (
        len(parts) == 1 or parts[0].endswith(".mlpackage"))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_bundle(bundle: str | Path, *, check_hashes: bool = True) -> dict:
    """Read and check a bundle's manifest and files; returns the manifest."""
    bundle = Path(bundle)
    fix = "re-export the bundle with autoglm-export"
    if not bundle.is_dir():
        raise BundleError("bundle directory not found", file=bundle, fix="pass the --out directory of an export")
    mpath = bundle / MANIFEST
    if not mpath.is_file():
        raise BundleError("not a bundle: manifest.json is missing", file=mpath, fix=fix)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"manifest is not valid JSON ({e.__class__.__name__})", file=mpath, fix=fix) from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        got = manifest.get("schema_version") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError("unsupported manifest", file=mpath, field="schema_version", expected=str(SCHEMA_VERSION),
                          got=repr(got), fix=fix)  # fmt: skip
    for key in ("target", "files", "components", "shapes", "prompt", "preprocessing"):
        if key not in manifest:
            raise BundleError("manifest field missing", file=mpath, field=key, fix=fix)
    if check_hashes:
        for name, entry in manifest["files"].items():
            path = bundle / name
            if not _safe_relative(name) or not path.is_file():
                raise BundleError("bundle file missing", file=path, field=f"files.{name}", fix=fix)
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(
                    "bundle file does not match its manifest hash (corrupted or modified)",
                    file=path,
                    field=f"files.{name}.sha256",
                    expected=entry["sha256"][:16] + "…",
                    fix=fix,
                )
    return manifest
