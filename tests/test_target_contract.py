"""The target contract: one table row and one package per target, every row honouring the
``Target`` base class, no import cycles, and a new target added by its folder and a row alone."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from autoglm_export.targets import TARGETS, Target, get_target
from conftest import REPO, one_bucket

PACKAGE = REPO / "autoglm_export"


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_target_in_the_table_honours_the_contract(name):
    from autoglm_export.cli import TARGET_HELP
    from autoglm_export.recipe import load_recipe

    caps = TARGETS[name]
    first, second = get_target(name), get_target(name)
    assert isinstance(first, Target) and first is not second  # a fresh object per export
    assert first.capabilities is caps and first.name == name
    assert isinstance(first.runtime_name, str) and first.runtime_name
    cls = type(first)
    # the class lives in the target's own package
    module = Path(importlib.import_module(cls.__module__).__file__)
    assert module.parent.parent == PACKAGE / "targets" and module.parent.name == name.replace("-", "_")

    def overrides(method: str) -> bool:
        return getattr(cls, method) is not getattr(Target, method)

    # what the table says is what the class does, and the reverse
    assert overrides("torchao_config") == caps.quantizes_in_torch
    assert overrides("lower_part") == caps.decoder_in_parts
    assert overrides("reference_component") == caps.own_reference
    assert overrides("bundle_weights") == (not caps.quantizes_in_torch and not caps.own_reference)
    if caps.calibrated or caps.recipe_sections:
        assert overrides("configure")
    # its recipes validate as this target's, and the CLI offers it
    for recipe in (f"{name}.yaml", f"{name}-tiny.yaml"):
        assert load_recipe(REPO / "recipes" / recipe).target == name
    assert name in TARGET_HELP.split(" | ") or f"Target: {name}" in TARGET_HELP


def test_an_unknown_target_is_a_one_line_error_listing_the_table():
    from autoglm_export.errors import ExportError
    from autoglm_export.recipe import parse_recipe
    from autoglm_export.errors import RecipeError

    with pytest.raises(ExportError) as e:
        get_target("tflite")
    assert " | ".join(TARGETS) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "r", "target": "tflite"}, "r.yaml")
    assert "target = 'tflite': must be one of 'xnnpack', 'qnn', 'coreml', 'onnx' or 'onnx-qnn'" in str(e.value)


def _imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of its code: a lazy import is a
    dependency too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".")
                    if node.level
                    else node.module
                )
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            for dep in found:
                while dep and dep not in modules:
                    dep = dep.rpartition(".")[0]
                if dep and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def test_no_import_cycles_and_targets_import_nothing_above_them():
    graph = _imports()
    assert len(graph) > 60 and "autoglm_export.targets.qnn.target" in graph  # the walk saw the package
    # no cycles (iterative depth-first search)
    state: dict[str, int] = {}
    for root in graph:
        stack = [(root, iter(sorted(graph[root])))]
        state[root] = state.get(root, 0) or 1
        if state[root] == 2:
            continue
        path = [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    # targets depend on shared pieces below them, never on the stages that drive them, and a
    # target's package never on another target's
    above = {
        "cli",
        "pipeline",
        "verify",
        "runner",
        "chat_engine",
        "opened_bundle",
        "golden_bundle",
        "optimum_command",
        "inspection",
        "serve",
    }
    packages = {n.replace("-", "_") for n in TARGETS}
    for name, deps in graph.items():
        if not name.startswith("autoglm_export.targets."):
            continue
        own = name.split(".")[2]
        for dep in deps:
            parts = dep.split(".")
            assert parts[1] not in above, f"{name} imports {dep}"
            if parts[1] == "targets" and len(parts) > 2 and parts[2] in packages:
                assert parts[2] == own, f"{name} imports another target's {dep}"


def test_a_toy_target_needs_only_its_folder_and_a_table_row(tiny_ckpt, tmp_path, monkeypatch):
    """tests/toy_target/ and one Capabilities row: the recipe schema, the planner, the export with
    its parity gates, the manifest and opening the bundle all take the new target unchanged."""
    import torch

    from autoglm_export.opened_bundle import open_bundle
    from autoglm_export.pipeline import export
    from autoglm_export.recipe import load_recipe

    row = dataclasses.replace(
        TARGETS["onnx"], name="toy", entry="toy_target.target:ToyTarget", summary="the onnx lowering under another name"
    )
    monkeypatch.setitem(TARGETS, "toy", row)
    recipe = tmp_path / "toy.yaml"
    text = one_bucket((REPO / "recipes" / "onnx-tiny.yaml").read_text())
    recipe.write_text(text.replace("target: onnx", "target: toy", 1))
    assert load_recipe(recipe).target == "toy"
    report = export(checkpoint=tiny_ckpt, target="toy", out=tmp_path / "bundle", recipe=recipe)
    assert report["passed"] and {c["name"] for c in report["checks"]} >= {
        "text_decoder/lowered_vs_reference",
        "end_to_end/greedy_lowered_vs_reference",
    }
    manifest, runtime, tokenizer, _ = open_bundle(tmp_path / "bundle")
    assert manifest["target"] == "toy" and manifest["runtime"] == "toy: onnxruntime (CPUExecutionProvider)"
    assert manifest["versions"]["toy"] == "1"
    ids = torch.tensor([tokenizer.encode("hello")])
    assert runtime.token_embedding(ids).shape[:2] == ids.shape
