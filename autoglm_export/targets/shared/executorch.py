"""What every ExecuTorch target shares: torch.export with the runner's method names and dynamic
dims, the runner-contract metadata methods, delegation statistics and the host runtime."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram, export

from ...bundle import decoder_part_paths, program_data_files
from ...methods import is_vision_method
from .export_caches import release_export_caches
from .page_locking import mlock_refused

_LAYER = re.compile(r"(.*\.)?layers\.\d+")
# bookkeeping nodes that are not compute
_NON_COMPUTE = {"getitem", "alloc", "sym_size", "sym_size.int", "_assert_scalar", "sym_constrain_range_for_size"}


def export_component(name: str, module: torch.nn.Module, prefill_chunk: int) -> ExportedProgram:
    """torch.export one component; token_embedding and text_decoder take 1..prefill_chunk tokens.

    ``strict=True`` is required: with ``strict=False`` the KV cache becomes a constant and
    lowering fails.
    """
    with torch.no_grad():
        try:
            if is_vision_method(name) or name == "audio_encoder":  # fixed image size / audio window
                return export(module, module.example_inputs(), strict=True)
            T = Dim("T", min=1, max=prefill_chunk)
            length = min(4, prefill_chunk)
            if name == "token_embedding":
                return export(module, module.example_inputs(length), dynamic_shapes=({1: T},), strict=True)
            if name == "text_decoder":
                return export(
                    module, module.example_inputs(length), dynamic_shapes=({1: T}, {1: T}, {0: T}), strict=True
                )
        finally:
            release_export_caches()
    raise KeyError(name)


def metadata_methods(manifest_model: dict, dynamic_shape: bool = True) -> dict:
    """Constant methods of the ExecuTorch LLM runner contract (extension/llm/runner/constants.h)."""
    return {
        "get_max_seq_len": manifest_model["max_context"],
        "get_max_context_len": manifest_model["max_context"],
        "use_kv_cache": True,
        "enable_dynamic_shape": dynamic_shape,
        "get_eos_ids": list(manifest_model["eos_ids"]),
        "get_bos_id": manifest_model["bos_id"],
        "get_vocab_size": manifest_model["vocab_size"],
    }


def _in_layer(node) -> bool:
    """Whether a node comes from inside a repeated layer (module path ``layers.<i>``)."""
    return any(_LAYER.fullmatch(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values())


def delegation_stats(edge_program: ExportedProgram) -> dict:
    """Share of compute ops inside delegates, and which ops stayed on the portable CPU kernels; the
    same for the ops of the decoder's (or an encoder's) repeated layers alone under ``layers``, where
    what runs once per call (mask, rotary tables, last-position pick) does not count."""
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    def compute(n) -> bool:
        return n.op == "call_function" and getattr(n.target, "__name__", str(n.target)) not in _NON_COMPUTE

    outside: Counter = Counter()
    layer_outside: Counter = Counter()
    delegates = inside = layer_inside = 0
    gm = edge_program.graph_module
    for _, lowered, _ in get_lowered_submodules(gm):
        delegates += 1
        for n in lowered.original_module.graph.nodes:
            if compute(n):
                inside += 1
                layer_inside += _in_layer(n)
    for n in gm.graph.nodes:
        name = getattr(n.target, "__name__", str(n.target))
        if not compute(n) or name == "executorch_call_delegate":
            continue
        outside[name] += 1
        if _in_layer(n):
            layer_outside[name] += 1
    total = inside + sum(outside.values())
    stats = {
        "delegates": delegates,
        "ops_delegated": inside,
        "ops_outside": dict(sorted(outside.items())),
        "delegated_share": round(inside / total, 4) if total else 1.0,
    }
    layer_total = layer_inside + sum(layer_outside.values())
    if layer_total:
        stats["layers"] = {
            "ops_delegated": layer_inside,
            "ops_outside": dict(sorted(layer_outside.items())),
            "delegated_share": round(layer_inside / layer_total, 4),
        }
    return stats


@contextlib.contextmanager
def quiet_native_output():
    """Hide what native runtimes print to the process's stdout and stderr (cpuinfo probing /sys on
    x86, QNN's LIBNATIVE and context teardown lines): stdout carries our report table. Failures
    still surface as Python exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "wb") as null:
            for fd in saved:
                os.dup2(null.fileno(), fd)
        yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def contract_check(
    runtime: "ExecuTorchRuntime", manifest: dict, methods: set[str] | None = None, dynamic_shape: bool = True
) -> dict:
    """Every runner-contract metadata method runs and returns what the manifest promises, and the
    program has the expected methods (the components, unless ``methods`` says otherwise)."""
    want = metadata_methods(
        {
            "max_context": manifest["shapes"]["max_context"],
            "eos_ids": manifest["prompt"]["eos_ids"],
            "bos_id": manifest["prompt"]["bos_id"],
            "vocab_size": manifest["model"]["text"]["vocab_size"],
        },
        dynamic_shape,
    )
    got = {name: runtime.metadata(name) for name in want}
    wrong = {name: got[name] for name in want if got[name] != want[name]}
    missing = sorted((methods or set(manifest["components"])) - runtime.method_names)
    return {
        "name": "runtime/metadata_methods",
        "kind": "contract",
        "gated": True,
        "passed": not wrong and not missing,
        "note": "ExecuTorch LLM runner contract: metadata values and component methods",
        "values": got,
        "mismatched": wrong,
        "missing_methods": missing,
    }


class HostProgram:
    """One loaded ``.pte``: its method names; each ``load_method`` loads a method anew (callers keep
    what they load)."""

    def __init__(self, program) -> None:
        self._program = program
        self.method_names = {program.get_method_name(i) for i in range(program.num_methods())}

    def load_method(self, name: str) -> "HostMethod":
        with mlock_refused():  # the delegates' blobs are loaded (and packed) here
            return HostMethod(self._program.load_method(name))


class HostMethod:
    def __init__(self, method) -> None:
        self._method = method

    def execute(self, inputs) -> list:
        return self._method(inputs)


def load_program(path: Path, data_path: Path | None = None) -> HostProgram:
    """A ``.pte`` loaded by ExecuTorch's C++ runtime (its Python bindings), memory-mapped and not
    locked in memory (``page_locking``).

    The bindings are imported without ``executorch.runtime``, which does the same through a thin
    wrapper but first imports the whole ``executorch.exir`` compiler (for one warning class):
    2.5-3.5 s and ~140 MB of RSS on every ``run`` and ``serve`` start, for nothing a bundle uses.
    """
    import executorch.kernels.quantized  # noqa: F401  registers embedding_4bit & co.
    from executorch.extension.pybindings import _C

    with mlock_refused():
        program = _C._load_program(
            str(path),
            program_verification=_C.Verification.Minimal,
            data_path=str(data_path) if data_path else None,
        )
    return HostProgram(program)


class ExecuTorchRuntime:
    """A bundle's ``model.pte`` through ExecuTorch's C++ runtime; same interface as ``EagerRuntime``.

    The KV cache lives inside the ``text_decoder`` method. ``reset`` does not clear it: every
    slot after the current position is masked, and the prefill rewrites the slots before it.
    A decoder lowered in parts (``decoder_parts``: one ``.pte`` per run of layers, each with its
    own slice of the KV cache) runs them in order, hidden states passed from one to the next.
    """

    def __init__(
        self,
        pte: Path,
        max_context: int,
        prefill_chunk: int,
        decoder_parts: list[Path] | None = None,
        data_files: dict[Path, Path] | None = None,
    ) -> None:
        data_files = data_files or {}

        def load(path: Path) -> HostProgram:
            return load_program(path, data_files.get(Path(path)))

        with quiet_native_output():
            self.program = load(pte)
            self.part_programs = [load(p) for p in decoder_parts or []]
            # ExecuTorch gives every host-only method of one Program the same memory arenas,
            # the KV cache (a planned mutable buffer) included: running vision_encoder between two
            # decoder calls overwrote the cache (logits off by up to 12 on the tiny bundle, found by
            # multi-turn prefix reuse). The decoder gets a Program of its own, and so its own arenas.
            self.decoder_program = load(pte) if not self.part_programs else None
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self._methods: dict = {}
        self._part_methods: list = []
        if "get_max_context_len" in self.program.method_names:
            # the manifest is not hashed: the program's own constant bounds the cache positions used
            built = int(self.metadata("get_max_context_len"))
            if built != max_context:
                from ...errors import BundleError

                raise BundleError(
                    "manifest disagrees with the program's KV cache length",
                    file=pte,
                    field="shapes.max_context",
                    expected=f"{built} (get_max_context_len of {pte.name})",
                    got=str(max_context),
                    fix="re-export the bundle with autoglm-export",
                )

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: dict, pte: str) -> "ExecuTorchRuntime":
        shapes = manifest["shapes"]
        return cls(
            bundle / pte,
            shapes["max_context"],
            shapes["prefill_chunk"],
            decoder_part_paths(bundle, manifest),
            program_data_files(bundle, manifest),
        )

    @property
    def method_names(self) -> set[str]:
        names = set(self.program.method_names)
        for p in self.part_programs:
            names |= set(p.method_names)
        return names

    def method(self, name: str):
        if name not in self._methods:
            program = (
                self.decoder_program if name == "text_decoder" and self.decoder_program is not None else self.program
            )
            with quiet_native_output():
                self._methods[name] = program.load_method(name)
        return self._methods[name]

    def metadata(self, name: str):
        """A runner-contract constant; list constants (get_eos_ids) come back as one output each."""
        out = list(self.method(name).execute([]))
        return out[0] if len(out) == 1 else out

    def token_embedding(self, input_ids):
        return self.method("token_embedding").execute([input_ids.contiguous()])[0]

    def vision_encoder(self, pixel_values, method: str = "vision_encoder"):
        return self.method(method).execute([pixel_values.contiguous()])[0]

    def audio_encoder(self, input_features):
        return self.method("audio_encoder").execute([input_features.contiguous()])[0]

    def text_decoder(self, embeds, position_ids, cache_position):
        position_ids, cache_position = position_ids.contiguous(), cache_position.contiguous()
        if not self.part_programs:
            return self.method("text_decoder").execute([embeds.contiguous(), position_ids, cache_position])[0]
        if not self._part_methods:
            # last part first: it holds the lm_head, the largest delegate blob, which XNNPACK packs into
            # buffers of its own and then frees; packed while no other part's packed weights are held,
            # its blob and copy are not resident beside them (peak 2.37 -> 2.16 GiB at 9B widths, 4 layers)
            with quiet_native_output():
                loaded = [p.load_method("text_decoder") for p in reversed(self.part_programs)]
            self._part_methods = loaded[::-1]
        x = embeds.contiguous()
        for m in self._part_methods:
            x = m.execute([x, position_ids, cache_position])[0]
        return x

    def reset(self) -> None:
        pass

    def close(self) -> None:
        """Nothing to end: the runtime lives in this process."""
