"""What every target is and does: a frozen capabilities record (one row of ``table.TARGETS``)
and the ``Target`` base class that the pipeline and the verifier drive.

A target object lives for one export or one ``verify``: qnn keeps its calibration data and the
emulator twin of a weight-shared program between ``lower`` and verification, so two exports never
share one. Everything the pipeline and the verifier may call is declared here; optional steps
default to doing nothing, so no caller probes a target with ``hasattr``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..progress import silent


@dataclass(frozen=True)
class Capabilities:
    """A target's facts, readable without importing its toolchain (the recipe schema, the planner
    and the CLI read them; ``get_target`` imports ``entry`` only when the target is used)."""

    name: str  # the --target name and the recipes' ``target``
    entry: str  # "package.module:Class" of its Target subclass
    summary: str  # one line for --help and the docs: what it runs on
    quantizes_in_torch: bool  # recipe rules applied with torchao while weights stream in (else on its own graph)
    decoder_in_parts: bool = False  # lowering.decoder_layers_per_program
    decoder_parts_last: bool = False  # parts lowered after the other components (calibrated on their outputs)
    data_files: str | None = None  # None: lowering.external_weights writes data files; else where weights stay
    calibrated: bool = False  # activation ranges from the recipe's calibration files
    per_channel_int4: bool = False  # int4 only with one scale per output channel (a rule's group_size is not used)
    int4_groups_only: bool = False  # no per-channel int4: a weight no int4 group divides falls back to int8 per channel
    channel_int4_rules: bool = False  # accepts group_size 'channel' in a rule
    recipe_sections: tuple[str, ...] = ()  # target-only recipe sections (e.g. "qnn")
    load_dtype: str | None = None  # float type its components load in ("fp16"), else the plan's
    own_reference: bool = False  # its "same quantization" reference is its own (reference_component)


class Target(ABC):
    """One export's (or one ``verify``'s) target. ``progress`` receives the lines of work that
    happens inside ``export`` (qnn quantizes there); ``verifying`` is False only for a library
    export without verification (``bench/scale.py``), so nothing is kept for a check that will not run."""

    runtime_name: ClassVar[str]  # the runtime verification uses on this host
    calibration_set: Any = None  # what ``configure`` loaded from the recipe's calibration files

    def __init__(
        self, capabilities: Capabilities, *, progress: Callable[[str], None] = silent, verifying: bool = True
    ) -> None:
        self.capabilities = capabilities
        self.progress = progress
        self.verifying = verifying

    @property
    def name(self) -> str:
        return self.capabilities.name

    # ------------------------------------------------------------------ export

    def configure(self, recipe, recipe_file: str, *, tokenizer, pre, base: Path | None = None) -> None:
        """Read the recipe sections only this target uses (calibration files, qnn contexts);
        called before ``check_plans``, at export and in ``verify``."""

    @abstractmethod
    def check_plans(self, plans: dict, recipe_file: str, parts: list | None = None) -> None:
        """Refuse, with a one-line error, schemes this target cannot honour, before any tensor is read."""

    def torchao_config(self, scheme: str, group_size, module):
        """How an int4 / int8 rule is realised for this target's kernels (``quantizes_in_torch`` targets)."""
        raise TypeError(f"target {self.name} quantizes its own graph, not with torchao")

    @abstractmethod
    def export(self, name: str, module, prefill_chunk: int) -> Any:
        """The traced graph(s) of one component."""

    @abstractmethod
    def lower(self, programs: dict, model_meta: dict, out_dir: Path, progress, plans: dict) -> dict:
        """Write the artifacts into ``out_dir``; ``{"files": [...], "methods": {component: {...}}}``
        and optionally ``"manifest": {...}`` (target-specific top-level sections)."""

    def lower_part(self, name: str, program, layers: tuple[int, int], out_dir: Path, progress, plan) -> dict:
        """One part of a decoder lowered in parts (``capabilities.decoder_in_parts``)."""
        raise TypeError(f"target {self.name} does not lower the decoder in parts")

    def release(self) -> None:
        """Drop what was kept outside the bundle for its verification (qnn: the emulator twin)."""

    # ------------------------------------------------------------------ runtime and verification

    @abstractmethod
    def open_runtime(self, bundle: Path, manifest: dict):
        """A ``host.generate.Runtime`` over the bundle's files on this host."""

    @abstractmethod
    def versions(self) -> dict:
        """Library versions recorded in the manifest."""

    def reference_component(self, name: str, plan, bundle: Path, manifest: dict, load):
        """A callable standing in for the "same quantization" PyTorch module (``own_reference``
        targets); None: the verifier builds it (torchao, or ``bundle_weights``)."""
        return None

    def bundle_weights(self, name: str, root, bundle: Path, manifest: dict, per_call: bool = True):
        """An ``on_module`` hook (with ``finish()``) that puts the weights the bundle holds into the
        fp32 reference module while it loads (targets that quantize their own graph and have no
        ``reference_component``); ``per_call``: large weights may stay quantized, dequantized on each
        call (False: plain weights, for a reference that is exported again)."""
        raise TypeError(f"target {self.name} has no way to read its bundle's weights back")

    def contract_checks(self, runtime, manifest: dict) -> list[dict]:
        """Gated checks of the runtime's own contract (kind ``contract``)."""
        return []

    def checkpoint_checks(
        self, ckpt, shapes, plans: dict, *, bundle: Path, manifest: dict, progress=silent
    ) -> list[dict]:
        """Gated checks of the bundle's weights against the checkpoint."""
        return []

    def refuse_against(self, against: str, bundle: Path) -> None:
        """Raise a one-line error before any check when ``verify --against`` cannot apply."""

    def against_onnxruntime(self, **kw) -> dict | None:
        """This target's own ``verify --against onnxruntime`` report; None: the generic one."""
        return None
