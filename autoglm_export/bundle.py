"""Bundle layout and manifest: what an app or the host runner needs to use the exported model.

``manifest.json`` lists every file with its size and sha256; ``load_bundle`` checks them all
before anything is loaded, so a corrupted or tampered bundle is refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import __version__
from .errors import BundleError, excerpt
from .fsutil import sha256_file
from .methods import vision_method
from .recipe import MAX_IMAGE_BUCKETS, MAX_IMAGE_SIDE

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


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
    mapped to that data file, which must be one the manifest hashes (the check ``load_bundle`` makes)."""
    check_opened_files(Path(bundle), manifest, Path(bundle) / MANIFEST)
    out = {}
    for comp in manifest["components"].values():
        for entry in [comp, *(comp.get("programs") or [])]:
            if entry.get("data_file") is not None:
                out[Path(bundle) / entry["file"]] = Path(bundle) / entry["data_file"]
    return out


def _safe_relative(name: str) -> bool:
    """A manifest file name stays inside the bundle: plain names, or paths inside a package
    directory (Core ML ``.mlpackage``), never absolute, hidden or with ``..``."""
    if not isinstance(name, str) or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and all(p and not p.startswith(".") for p in parts)
        and (len(parts) == 1 or parts[0].endswith(".mlpackage"))
    )


def _inside(bundle: Path, name: str) -> bool:
    """``name`` resolves, symlinks followed, to a path inside the bundle directory."""
    try:
        (bundle / name).resolve().relative_to(bundle.resolve())
    except (ValueError, OSError):
        return False
    return True


# keys under manifest.components whose values name a file (or a Core ML package) a runtime opens
FILE_KEYS = ("file", "data_file", "model", "context")
LIST_FILE_KEYS = ("binaries", "data_files")
MAX_CONTEXT_LIMIT = 1 << 20


def opened_files(manifest: dict) -> list[tuple[str, str]]:
    """Every (field, name) of a file a runtime opens: what the components name, the tokenizer and the
    chat template."""
    out = [("tokenizer", "tokenizer.json")]

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in FILE_KEYS and not isinstance(v, (dict, list)):
                    out.append((f"{where}.{k}", v))
                elif k in LIST_FILE_KEYS and isinstance(v, list):
                    out.extend((f"{where}.{k}[{i}]", x) for i, x in enumerate(v))
                else:
                    walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(manifest["components"], "components")
    prompt = manifest.get("prompt")
    if isinstance(prompt, dict) and "chat_template" in prompt:
        out.append(("prompt.chat_template", prompt["chat_template"]))
    return out


def _check_structure(manifest: dict, mpath: Path) -> None:
    """The manifest's shape, before any field of it steers a load (malformed manifests are one-line errors)."""
    fix = "re-export the bundle with autoglm-export"

    def bad(field: str, expected: str, got: object) -> BundleError:
        return BundleError(
            "malformed manifest", file=mpath, field=field, expected=expected, got=excerpt(repr(got)), fix=fix
        )

    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files", "a mapping of file name -> {bytes, sha256}", type(files).__name__)
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
        ):
            raise bad(f"files.{excerpt(name, 80)}", "{bytes: integer, sha256: 64 hex digits}", entry)
    comps = manifest["components"]
    if not isinstance(comps, dict) or not isinstance(comps.get("text_decoder"), dict):
        raise bad(
            "components.text_decoder",
            "a mapping per component, text_decoder among them",
            sorted(comps) if isinstance(comps, dict) else type(comps).__name__,
        )
    for name, comp in comps.items():
        if not isinstance(comp, dict) or not isinstance(comp.get("file"), str):
            raise bad(
                f"components.{excerpt(name, 80)}.file",
                "a file name",
                comp.get("file") if isinstance(comp, dict) else comp,
            )
        programs = comp.get("programs")
        if programs is not None and (
            not isinstance(programs, list)
            or not all(isinstance(p, dict) and isinstance(p.get("file"), str) for p in programs)
        ):
            raise bad(f"components.{name}.programs", "a list of {file: name, ...}", programs)
    shapes = manifest["shapes"]
    mc = shapes.get("max_context") if isinstance(shapes, dict) else None
    if not isinstance(mc, int) or isinstance(mc, bool) or not 2 <= mc <= MAX_CONTEXT_LIMIT:
        raise bad("shapes.max_context", f"an integer from 2 to {MAX_CONTEXT_LIMIT}", mc)
    recorded = _dig(manifest, "recipe", "content", "shapes", "max_context", default=mc)
    cache = _dig(comps["text_decoder"], "state", "kv_cache", "shape", default=[None, None, mc])
    if recorded != mc or (isinstance(cache, list) and len(cache) > 2 and cache[2] != mc):
        raise bad("shapes.max_context", f"the KV cache length the decoder was exported with ({recorded})", mc)
    buckets = _dig(manifest, "preprocessing", "buckets")
    if not isinstance(buckets, list) or not 1 <= len(buckets) <= MAX_IMAGE_BUCKETS:
        raise bad(
            "preprocessing.buckets",
            f"1 to {MAX_IMAGE_BUCKETS} image buckets (bundles before image buckets had preprocessing.image_size)",
            buckets if isinstance(buckets, list) else type(buckets).__name__,
        )
    for i, b in enumerate(buckets):
        h, w = (b.get("height"), b.get("width")) if isinstance(b, dict) else (None, None)
        sides_ok = all(isinstance(x, int) and not isinstance(x, bool) and 28 <= x <= MAX_IMAGE_SIDE for x in (h, w))
        if not sides_ok or b.get("method") != vision_method(i, (h, w)) or b["method"] not in comps:
            raise bad(
                f"preprocessing.buckets[{i}]",
                f"{{height, width: 28..{MAX_IMAGE_SIDE}, method: the vision component of that size}}",
                b,
            )


def _dig(node, *keys: str, default=None):
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def check_opened_files(bundle: Path, manifest: dict, mpath: Path) -> None:
    """Every file a runtime opens is named relative, stays inside the bundle, and is hashed in ``files``."""
    files = manifest["files"]
    for name in files:
        if not _safe_relative(name) or not _inside(bundle, name):
            raise BundleError(
                "manifest names a file outside the bundle",
                file=mpath,
                field="files",
                got=excerpt(repr(name)),
                fix="re-export the bundle with autoglm-export",
            )
    packages = {n.split("/")[0] for n in files if "/" in n}
    for field, name in opened_files(manifest):
        if not _safe_relative(name) or not _inside(bundle, name):
            raise BundleError(
                "manifest names a file outside the bundle",
                file=mpath,
                field=field,
                expected="a file name inside the bundle",
                got=excerpt(repr(name)),
                fix="re-export the bundle with autoglm-export",
            )
        if name not in files and name not in packages:
            raise BundleError(
                "manifest names a file it does not hash",
                file=mpath,
                field=field,
                got=excerpt(repr(name)),
                expected="a name listed in files (with its sha256)",
                fix="re-export the bundle with autoglm-export",
            )


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_bundle(bundle: str | Path, *, check_hashes: bool = True, trust_stamp: bool = False) -> dict:
    """Read and check a bundle's manifest and files; returns the manifest. ``trust_stamp``: skip
    re-hashing files whose identity is unchanged since the last full check (``run``)."""
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
        raise BundleError(
            "unsupported manifest",
            file=mpath,
            field="schema_version",
            expected=str(SCHEMA_VERSION),
            got=repr(got),
            fix=fix,
        )
    for key in ("target", "files", "components", "shapes", "prompt", "preprocessing"):
        if key not in manifest:
            raise BundleError("manifest field missing", file=mpath, field=key, fix=fix)
    _check_structure(manifest, mpath)
    check_opened_files(bundle, manifest, mpath)
    stamp = _stamp(bundle, mpath.read_bytes()) if check_hashes else None
    if check_hashes and not (trust_stamp and _stamp_matches(stamp, bundle, manifest)):
        for name, entry in manifest["files"].items():
            path = bundle / name
            if not path.is_file():
                raise BundleError("bundle file missing", file=path, field=f"files.{name}", fix=fix)
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise BundleError(
                    "bundle file does not match its manifest hash (corrupted or modified)",
                    file=path,
                    field=f"files.{name}.sha256",
                    expected=entry["sha256"][:16] + "…",
                    fix=fix,
                )
        _write_stamp(stamp, bundle, manifest)
    return manifest


# A 9B bundle is ~6 GB: hashing it on every `run` cost seconds of start-up. After a full check,
# each file's size, mtime, ctime and inode go to a stamp in the user's cache (never into the
# bundle), keyed by the bundle's path and its manifest's bytes; `run` skips re-hashing while every
# file still has the same identity. A change through the file system moves ctime, which no user can
# set back; `verify` always hashes everything.
def _stamp(bundle: Path, manifest_bytes: bytes) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autoglm-export" / "verified"
    key = hashlib.sha256(str(bundle.resolve()).encode() + b"\0" + manifest_bytes).hexdigest()[:32]
    return root / f"{key}.json"


def _identities(bundle: Path, manifest: dict) -> dict:
    out = {}
    for name in sorted(manifest["files"]):
        st = (bundle / name).stat()
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _stamp_matches(stamp: Path, bundle: Path, manifest: dict) -> bool:
    try:
        return json.loads(stamp.read_text()) == _identities(bundle, manifest)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, bundle: Path, manifest: dict) -> None:
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(_identities(bundle, manifest)))
    except OSError:  # a read-only home only costs the next run a full hash
        pass
