"""Recipes: one YAML schema for target, static shapes, ordered quantization rules and parity gates.

Rules are matched, first match wins, against ``<component>.<weight name>`` (for example
``text_decoder.layers.3.mlp.down_proj.weight``) with Python regular expressions (full match).
Schemes: ``int4`` (group-wise, ``group_size`` required; ``channel`` = one scale per output
row, coreml only), ``int8`` (per output channel),
``fp16`` / ``fp32`` (kept in float). A weight no rule matches stays fp32. Rules say nothing
about packing: each target picks its own kernels for a scheme.

Every problem in a file is reported at once, each with field, value, rule and fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import regex
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, excerpt
from .targets.table import TARGETS

SCHEMES = ("int4", "int8", "fp16", "fp32")
INT4_GROUP_SIZES = (16, 32, 64, 128, 256)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# A recipe is untrusted: its patterns run through `regex` (immune to the nested-quantifier
# blow-ups of `re`, e.g. '(.*)*X') with a time limit on every match all the same, and the file
# is read with aliases refused and its size capped (a 477-byte alias bomb expanded to 2.8 GB).
MATCH_TIMEOUT_S = 1.0
MAX_RECIPE_BYTES = 1 << 20


class RuleTimeout(ValueError):
    """A quantization pattern took too long on one weight name."""

    def __init__(self, index: int, pattern: str, weight: str) -> None:
        super().__init__(
            f"quantization[{index}].match = {excerpt(repr(pattern))}: matching {weight!r} took over "
            f"{MATCH_TIMEOUT_S:g} s; simplify the pattern (no nested repetition such as '(.*)*')"
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A square bucket for photos and a ~9:20 portrait one for phone screens (1080 x 2400 and the like):
# 144 and 312 image tokens.
DEFAULT_IMAGES = ((336, 336), (728, 336))
MAX_IMAGE_BUCKETS = 8
MAX_IMAGE_SIDE = 2016  # 72 patches of 28: a 9B vision tower over more is minutes per image on a phone


def _image_side(v: int, what: str) -> str | None:
    if v < 28 or v % 28 or v > MAX_IMAGE_SIDE:
        return f"{what} must be a multiple of 28 (patch 14 x merge 2) from 28 to {MAX_IMAGE_SIDE}, got {v}"
    return None


class ShapesSpec(_Strict):
    images: list[tuple[int, int]] | None = Field(
        None,
        description="image buckets [[height, width], ...] in pixels, multiples of 28; each is one vision method "
        f"and an image goes to the bucket closest in aspect ratio (default {[list(b) for b in DEFAULT_IMAGES]})",
    )
    image_size: int | None = Field(
        None, description="one square bucket of this side (instead of images); a multiple of 28"
    )
    max_context: int = Field(2048, description="KV cache length (prompt + generated tokens)")
    prefill_chunk: int = Field(128, description="tokens per prefill call")
    audio_seconds: float = Field(3.2, description="fixed audio window (checkpoints with an audio tower)")

    @field_validator("image_size")
    @classmethod
    def _image(cls, v: int | None) -> int | None:
        if v is not None and (problem := _image_side(v, "the side")):
            raise ValueError(f"{problem}; use e.g. 336")
        return v

    @field_validator("images")
    @classmethod
    def _images(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is None:
            return v
        if not 1 <= len(v) <= MAX_IMAGE_BUCKETS:
            raise ValueError(f"must list 1 to {MAX_IMAGE_BUCKETS} [height, width] pairs, got {len(v)}")
        for i, (h, w) in enumerate(v):
            for what, x in (("height", h), ("width", w)):
                if problem := _image_side(x, f"images[{i}] {what}"):
                    raise ValueError(f"{problem}; use e.g. [[336, 336], [728, 336]]")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a size twice: {[list(b) for b in v]}; each bucket once")
        return v

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        if self.images is not None:
            return tuple(tuple(b) for b in self.images)
        return ((self.image_size, self.image_size),) if self.image_size is not None else DEFAULT_IMAGES

    @field_validator("max_context", "prefill_chunk")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"must be an integer >= 2, got {v}")
        return v

    @field_validator("audio_seconds")
    @classmethod
    def _audio(cls, v: float) -> float:
        if not math.isfinite(v) or v > 3600:
            raise ValueError(f"must be a finite number of seconds up to 3600, got {v}; use e.g. 3.2")
        frames = v * 100
        if v <= 0 or abs(frames - round(frames)) > 1e-6 or round(frames) % 8:
            raise ValueError(
                f"must be a positive multiple of 0.08 s (8 log-mel frames = 1 audio token), got {v}; use e.g. 3.2"
            )
        return v

    @model_validator(mode="after")
    def _chunk_fits(self):
        if self.images is not None and self.image_size is not None:
            raise ValueError("sets both images and image_size; keep images (image_size: S is images: [[S, S]])")
        if self.prefill_chunk > self.max_context:
            raise ValueError(
                f"prefill_chunk {self.prefill_chunk} is larger than max_context {self.max_context}; "
                "lower prefill_chunk or raise max_context"
            )
        return self


class QuantRuleSpec(_Strict):
    match: str = Field(description="regex, full match against '<component>.<weight name>'")
    scheme: Literal["int4", "int8", "fp16", "fp32"]
    group_size: int | Literal["channel"] | None = None

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            regex.compile(v)
        except regex.error as e:
            raise ValueError(f"not a valid regular expression ({e}); escape dots as '\\.'") from None
        return v

    @model_validator(mode="after")
    def _group(self):
        if self.scheme == "int4":
            if self.group_size is None:
                raise ValueError("scheme int4 needs group_size (32, 64, 128 or 256)")
            if self.group_size not in (*INT4_GROUP_SIZES, "channel"):
                raise ValueError(f"group_size must be one of 16, 32, 64, 128, 256 or 'channel', got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size applies to int4 only; remove it from this {self.scheme} rule")
        return self


class ParitySpec(_Strict):
    # a gate that can never fail is no gate: finite, and above 0 dB (signal louder than the error)
    float_sqnr_db: float = Field(60.0, gt=0, le=400, description="fp32 components, lowered vs PyTorch")
    fp16_sqnr_db: float = Field(40.0, gt=0, le=400, description="fp16 components vs the fp32 reference")
    quantized_sqnr_db: float = Field(
        35.0, gt=0, le=400, description="quantized components, lowered vs PyTorch with the same weights"
    )
    greedy_tokens: int = Field(32, ge=1, description="tokens of the end-to-end greedy check")
    greedy_agreement: float | None = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of greedy tokens that must agree; null: measured and reported, not gated",
    )


class QnnSpec(_Strict):
    max_context_bytes: int = Field(
        3_600_000_000,
        ge=1,
        le=4 * 1024**3,
        description="estimated weight bytes per HTP context; a component that needs more is split into "
        "several contexts at block boundaries (the HTP limit is 4 GiB)",
    )
    weight_sharing: bool = Field(
        True,
        description="prefill and decode graphs of a context share one copy of the weights; the x86 HTP "
        "emulator cannot load such contexts, so verification runs an unshared twin",
    )


class LoweringSpec(_Strict):
    decoder_layers_per_program: int | None = Field(
        None,
        ge=1,
        description="lower and write the text decoder in programs of this many layers, one at a time, so peak "
        "export memory follows this number instead of the model's layer count; the runtime chains "
        "them (manifest components.text_decoder.programs). null: one program",
    )
    external_weights: bool = Field(
        False,
        description="xnnpack: write each program's weights to a .ptd file beside its .pte (ExecuTorch program-data "
        "separation; manifest data_file); runtimes load the pair. The ExecuTorch Android Module API "
        "(executorch-android 1.5.1) loads a .pte alone, so the Android demo refuses such bundles",
    )


class CalibrationSpec(_Strict):
    images: list[str] = Field(default_factory=list, description="screenshots, relative to the recipe's directory")
    prompts: str | None = Field(None, description="text file, one prompt per line, relative to the recipe's directory")


def cross_field_problems(data: dict) -> list[str]:
    """Rules between sections, checked on the raw mapping too, so that they are reported together
    with any field errors (pydantic skips model validators once a field fails)."""
    target = data.get("target")
    if target not in TARGETS:
        return []
    caps = TARGETS[target]
    rules = data.get("quantization") if isinstance(data.get("quantization"), list) else []
    lowering = data.get("lowering") if isinstance(data.get("lowering"), dict) else {}
    problems = []
    for section in sorted({s for c in TARGETS.values() for s in c.recipe_sections} - set(caps.recipe_sections)):
        if section in data:
            problems.append(
                f"the {section} section applies to target {_targets_with(lambda c: section in c.recipe_sections)} "
                f"only; remove it from this {target} recipe"
            )
    channel = [i for i, r in enumerate(rules) if isinstance(r, dict) and r.get("group_size") == "channel"]
    if channel and not caps.channel_int4_rules:
        problems.append(
            f"group_size 'channel' (rule {channel[0]}) is for target {_targets_with(lambda c: c.channel_int4_rules)} "
            "only (per-channel INT4 for the Neural Engine); use a block size such as 32"
        )
    if lowering.get("decoder_layers_per_program") is not None and not caps.decoder_in_parts:
        problems.append(
            f"lowering.decoder_layers_per_program: {target} cannot lower the decoder in parts yet "
            f"(supported: {_targets_with(lambda c: c.decoder_in_parts)}); remove it"
        )
    if lowering.get("external_weights") and caps.data_files is not None:
        problems.append(
            f"lowering.external_weights: only {_targets_with(lambda c: c.data_files is None)} writes "
            f"ExecuTorch .ptd data files ({target} {caps.data_files}); remove it"
        )
    if data.get("calibration") is not None and not caps.calibrated:
        problems.append(
            f"calibration applies to {_targets_with(lambda c: c.calibrated)} only ({target} quantizes "
            "activations dynamically); remove it"
        )
    return problems


def _targets_with(has) -> str:
    return ", ".join(name for name, caps in TARGETS.items() if has(caps))


def _known_target(name: str) -> str:
    if name not in TARGETS:
        *rest, last = map(repr, TARGETS)
        raise ValueError(f"must be one of {', '.join(rest)} or {last}")
    return name


class Recipe(_Strict):
    name: str
    target: str  # a row of targets.table.TARGETS
    description: str = ""
    shapes: ShapesSpec = ShapesSpec()
    quantization: list[QuantRuleSpec] = Field(default_factory=list)
    parity: ParitySpec = ParitySpec()
    qnn: QnnSpec = QnnSpec()
    lowering: LoweringSpec = LoweringSpec()
    calibration: CalibrationSpec | None = None

    _target_known = field_validator("target")(_known_target)

    @model_validator(mode="after")
    def _target_sections(self):
        problems = cross_field_problems(self.model_dump(mode="json", exclude_unset=True))
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    def match(self, weight: str) -> tuple[int | None, QuantRuleSpec | None]:
        """The first rule whose pattern fully matches ``weight`` (index, rule), or (None, None)."""
        for i, rule in enumerate(self.quantization):
            try:
                hit = regex.fullmatch(rule.match, weight, timeout=MATCH_TIMEOUT_S)
            except TimeoutError:
                raise RuleTimeout(i, rule.match, weight) from None
            if hit:
                return i, rule
        return None, None

    def to_json(self) -> dict:
        # sections of other targets stay out, so the manifest's copy validates again in `verify`
        others = {s for c in TARGETS.values() for s in c.recipe_sections} - set(TARGETS[self.target].recipe_sections)
        return self.model_dump(mode="json", exclude=others)


PROBLEM_SEPARATOR = "\n"


def _describe(err: dict, data: dict) -> list[str]:
    loc = ".".join(str(p) for p in err["loc"])
    if not err["loc"]:  # a cross-field check: its messages name their own fields
        return err["msg"].removeprefix("Value error, ").split(PROBLEM_SEPARATOR)
    value: object = data
    for p in err["loc"]:
        try:
            value = value[p]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            value = "<missing>"
            break
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    elif err["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    elif err["type"] == "missing":
        msg = "required field is missing; add it"
    elif err["type"] == "finite_number":
        msg = "must be a finite number (no .inf or .nan)"
    return [f"{loc} = {excerpt(repr(value))}: {msg}"]


def parse_recipe(data: object, file: Path | str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(file, [f"(top level) = {type(data).__name__}: must be a mapping of recipe fields"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        lines = [line for err in errors for line in _describe(err, data)]
        if all(err["loc"] for err in errors):  # the cross-field check did not run: field errors stopped it
            lines += cross_field_problems(data)
        raise RecipeError(file, lines) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, ["file not found; `autoglm-export recipes list` shows the shipped recipes"])
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(path, [f"file is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}"])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(path, [f"not valid YAML ({excerpt(str(e).splitlines()[0])})"]) from None
    return parse_recipe(data, path)


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: a recipe never needs them, and nested aliases expand exponentially
    (a YAML 'billion laughs'); an anchor nothing refers to is harmless."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                "allowed in a recipe; write the value out"
            )
        return super().compose_node(parent, index)


def default_recipe_path(target: str) -> Path:
    return RECIPES_DIR / f"{target}.yaml"


def list_recipes() -> list[tuple[str, Path, Recipe]]:
    return [(p.stem, p, load_recipe(p)) for p in sorted(RECIPES_DIR.glob("*.yaml"))]
