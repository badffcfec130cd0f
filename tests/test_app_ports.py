"""The demo apps' logic: Kotlin core tests against golden vectors, every Kotlin/Swift source
parses, and every manifest key the app sources read exists in the manifests the exporter writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

ANDROID = REPO / "android_demo"
IOS = REPO / "ios_demo"
KOTLIN_CORE = ANDROID / "core" / "src"
JARS = [Path("/usr/share/java") / j for j in ("gson.jar", "junit4.jar", "hamcrest-core.jar", "kotlin-stdlib.jar")]


@pytest.fixture(scope="module")
def golden_dir(audio_xnnpack_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "golden"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_golden.py"),
            "--bundle",
            str(audio_xnnpack_bundle),
            str(out),
            "--conversation",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_golden_trace_is_the_bundle_runtime(golden_dir, audio_xnnpack_bundle):
    """The recorded trace is what `run` produces from the same bundle, and it is deterministic."""
    g = json.loads((golden_dir / "golden.json").read_text())
    calls = g["trace"]["calls"]
    methods = [c["method"] for c in calls]
    assert methods[0] == "reset" and "vision_encoder" in methods and "audio_encoder" in methods
    chunks = -(-len(g["prompt_ids"]) // 16)  # prefill calls of the recipe's 16-token chunk
    decoder = [c for c in calls if c["method"] == "text_decoder"]
    assert len(decoder) == chunks + len(g["trace"]["tokens"]) - 1
    argmax = [c["output"]["data"].index(max(c["output"]["data"])) for c in decoder[chunks - 1 :]]
    assert argmax == g["trace"]["tokens"]
    # the agent conversation: after the first turn no reset, and only the tokens after the reused
    # prefix are embedded and prefilled (the dropped screenshot ends the reuse)
    turns = g["conversation"]["turns"]
    assert [c["method"] for c in turns[0]["calls"]][0] == "reset"
    changed = 0  # choices the frequency penalty changed: the vectors must exercise it
    for t in turns:
        new = len(t["prompt_ids"]) - t["reused_tokens"]
        logits = [c["output"]["data"] for c in t["calls"] if c["method"] == "text_decoder"][-(-new // 16) - 1 :]
        changed += sum(tok != x.index(max(x)) for tok, x in zip(t["tokens"], logits))
    assert changed >= 1
    for prev, t in zip(turns, turns[1:]):
        ids, reuse = t["prompt_ids"], t["reused_tokens"]
        assert 3 < reuse < len(ids) - 1 and ids[:reuse] == prev["prompt_ids"][:reuse]
        embedded = [c["inputs"]["input_ids"]["data"] for c in t["calls"] if c["method"] == "token_embedding"]
        prefilled = [c["inputs"]["cache_position"]["data"] for c in t["calls"] if c["method"] == "text_decoder"]
        assert "reset" not in [c["method"] for c in t["calls"]]
        flat, slots = sum(embedded, []), sum(prefilled, [])
        assert flat[: len(ids) - reuse] == ids[reuse:]  # the new tokens, then the answer's fed back
        assert slots == list(range(reuse, reuse + len(flat)))  # each once, into the slots after the prefix
    again = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_golden.py"),
            "--bundle",
            str(audio_xnnpack_bundle),
            str(golden_dir.parent / "again"),
            "--conversation",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0
    assert (golden_dir.parent / "again" / "golden.json").read_bytes() == (golden_dir / "golden.json").read_bytes()


@pytest.fixture(scope="module")
def golden_static_dir(qnn_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden-qnn") / "golden"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_golden.py"), "--bundle", str(qnn_bundle[0]), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_kotlin_core_against_golden_vectors(golden_dir, golden_static_dir, tmp_path):
    """Compiles android_demo/core with kotlinc (Kotlin 1.3) and runs its JUnit 4 tests. Missing
    tools fail this test: `make test` installs them (Debian kotlin, junit4, libgoogle-gson-java)."""
    kotlinc = shutil.which("kotlinc")
    missing = [str(j) for j in JARS if not j.is_file()]
    assert kotlinc and not missing, (
        f"Kotlin toolchain missing (kotlinc: {kotlinc}, jars: {missing}); run `make test`, which installs "
        "the Debian packages kotlin junit4 libgoogle-gson-java"
    )
    classes = tmp_path / "classes"
    cp = ":".join(str(j) for j in JARS)
    sources = [str(p) for p in sorted(KOTLIN_CORE.rglob("*.kt"))]
    build = subprocess.run(
        [kotlinc, "-nowarn", "-cp", cp, "-d", str(classes), *sources], capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, build.stderr[-3000:]
    tests = sorted(p.stem for p in (KOTLIN_CORE / "test").rglob("*Test.kt"))
    assert len(tests) >= 2
    run = subprocess.run(
        [
            "java",
            f"-Dgolden.dir={golden_dir}",
            f"-Dgolden.static.dir={golden_static_dir}",
            "-cp",
            f"{classes}:{cp}",
            "org.junit.runner.JUnitCore",
            *[f"ai.autoglm.demo.core.{t}" for t in tests],
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    m = re.search(r"OK \((\d+) tests\)", run.stdout)
    assert m and int(m.group(1)) >= 36, run.stdout[-2000:]  # every @Test in the test sources
    assert {"StaticGraphReplayTest", "SamplingAndStopsTest", "ConversationReplayTest"} <= set(tests)


def _sources(ext: str) -> list[Path]:
    return sorted(p for root in (ANDROID, IOS) for p in root.rglob(f"*.{ext}"))


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_every_app_source_parses(lang, tmp_path):
    import tree_sitter
    import tree_sitter_kotlin
    import tree_sitter_swift

    grammar = {"kotlin": (tree_sitter_kotlin, "kt"), "swift": (tree_sitter_swift, "swift")}[lang]
    parser = tree_sitter.Parser(tree_sitter.Language(grammar[0].language()))
    files = _sources(grammar[1])
    assert len(files) >= 8
    bad = [str(f.relative_to(REPO)) for f in files if parser.parse(f.read_bytes()).root_node.has_error]
    assert not bad, f"syntax errors in {bad}"
    # the check can fail: a broken copy of the first file does not parse
    broken = files[0].read_bytes().replace(b"}", b"", 1) + b"\n)(\n"
    assert parser.parse(broken).root_node.has_error


ACCESSORS = (
    r"\b(req|opt|reqObj|optObj|reqInt|reqLong|reqDouble|reqString|reqInts|reqDoubles|reqArray)\(\"([A-Za-z0-9_]+)\"\)"
)


TOKENIZER_SOURCES = {"ByteLevelBpe.kt"}  # reads tokenizer.json, not the manifest


def _keys_read(root: Path, ext: str) -> tuple[set[str], set[str], set[str]]:
    required, optional, special = set(), set(), set()
    for f in root.rglob(f"*.{ext}"):
        if "test" in f.parts or "Tests" in f.parts or f.name in TOKENIZER_SOURCES:
            continue
        text = f.read_text()
        for fn, key in re.findall(ACCESSORS, text):
            (optional if fn.startswith("opt") else required).add(key)
        special |= set(re.findall(r"\b(?:special|sp)\(\"(\w+)\"", text))
    return required, optional, special


def _without_optional_sections(m: dict) -> dict:
    m = json.loads(json.dumps(m))
    m.pop("audio_preprocessing", None)
    for comp in m["components"].values():
        comp.pop("graphs", None)
        comp.pop("rope", None)
        comp.pop("programs", None)  # a decoder lowered in parts
    return m


def _all_keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _all_keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _all_keys(v)}
    return set()


@pytest.fixture(scope="module")
def manifests(xnnpack_bundle, audio_xnnpack_bundle, xnnpack_ptd_bundle, qnn_bundle, coreml_bundle) -> dict[str, dict]:
    """The apps' manifests: xnnpack without and with audio and with .ptd data files (which the
    Android app refuses, so it reads their key), qnn (Android), coreml with audio (iOS)."""
    return {
        "xnnpack": json.loads((xnnpack_bundle[0] / "manifest.json").read_text()),
        "xnnpack+audio": json.loads((audio_xnnpack_bundle / "manifest.json").read_text()),
        "xnnpack+ptd": json.loads((xnnpack_ptd_bundle / "manifest.json").read_text()),
        "qnn": json.loads((qnn_bundle[0] / "manifest.json").read_text()),
        "coreml+audio": json.loads((coreml_bundle / "manifest.json").read_text()),
    }


@pytest.mark.parametrize("app,ext", [("android", "kt"), ("ios", "swift")])
def test_manifest_contract(app, ext, manifests):
    root = ANDROID if app == "android" else IOS
    required, optional, special = _keys_read(root, ext)
    assert len(required) >= 25 and special >= {"gmask", "image", "assistant"}, (required, special)
    # keys inside optional sections (audio_preprocessing; a static bundle's graphs and rope; a decoder's parts) are
    # required only where their section exists; every other key in every manifest
    core = {name: _all_keys(_without_optional_sections(m)) for name, m in manifests.items()}
    optional_only = set().union(*(_all_keys(m) - core[name] for name, m in manifests.items()))
    for name in manifests:
        missing = sorted((required - optional_only) - core[name])
        assert not missing, f"{app} reads keys that the {name} manifest lacks: {missing}"
    union = set().union(*(_all_keys(m) for m in manifests.values()))
    assert not sorted((required | optional) - union), (
        f"{app} reads keys no manifest has: {sorted((required | optional) - union)}"
    )
    assert special <= set(manifests["xnnpack+audio"]["prompt"]["special_ids"])
    # component names the sources use are components the exporter writes
    used = set(
        re.findall(
            r"\"((?:vision|audio)_encoder|token_embedding|text_decoder)\"",
            "".join(f.read_text() for f in root.rglob(f"*.{ext}")),
        )
    )
    # ... all but the further image buckets' vision methods: the apps encode with the first (`vision_encoder`)
    buckets = [b["method"] for b in manifests["xnnpack+audio"]["preprocessing"]["buckets"]]
    assert buckets[0] == "vision_encoder" and len(buckets) == 2
    assert used == set(manifests["xnnpack+audio"]["components"]) - set(buckets[1:]), used
