"""Running a coreml bundle on a host: the numpy MIL interpreter (Linux) or Core ML's own
``predict`` (macOS). The host side (prefill / decode choice, cos/sin, mask) is shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .toolchain import import_coremltools


def package_records(manifest: dict) -> list[tuple[str, str, dict]]:
    """(label, component, entry) of every package in a bundle: one per component, or one per part
    of a decoder lowered in parts (label ``text_decoder.00-01``); entries have ``file`` and ``package``."""
    out = []
    for name, comp in manifest["components"].items():
        for entry in comp.get("programs") or [comp]:
            out.append((entry["file"].removesuffix(".mlpackage"), name, entry))
    return out


class _PackageRuntime:
    """Host side shared by the Linux interpreter and macOS predict: picks prefill / decode by
    length, computes cos/sin and the mask; the KV cache lives in the package's states."""

    def __init__(self, bundle: Path, manifest: dict) -> None:
        self.manifest = manifest
        self.max_context = manifest["shapes"]["max_context"]
        self.prefill_chunk = manifest["shapes"]["prefill_chunk"]
        self.rope = manifest["components"]["text_decoder"]["rope"]
        self.bundle = bundle
        self.records = package_records(manifest)
        # component -> (package label, function): the image buckets are functions of one package
        self.functions = {name: (label, entry.get("function", "main")) for label, name, entry in self.records}
        self.packages = {label: entry for label, _, entry in self.records}  # each package once
        # the decoder's packages in layer order: one, or one per part (hidden states passed along)
        self.decoder_labels = [label for label, name, _ in self.records if name == "text_decoder"]

    def _run(self, component: str, function: str, feeds: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_embedding(self, input_ids):
        ids = input_ids.numpy().astype(np.int32)
        T = ids.shape[1]
        if T == self.prefill_chunk:
            return torch.from_numpy(self._out("token_embedding", "prefill", {"input_ids": ids}))
        parts = [self._out("token_embedding", "decode", {"input_ids": ids[:, i : i + 1]}) for i in range(T)]
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def vision_encoder(self, pixel_values, method: str = "vision_encoder"):
        label, fn = self.functions[method]
        return torch.from_numpy(self._out(label, fn, {"pixel_values": pixel_values.numpy().astype(np.float32)}))

    def audio_encoder(self, input_features):
        return torch.from_numpy(
            self._out("audio_encoder", "main", {"input_features": input_features.numpy().astype(np.float32)})
        )

    def text_decoder(self, embeds, position_ids, cache_position):
        x, pos, slots = embeds.numpy().astype(np.float32), position_ids.numpy(), cache_position.numpy()
        T = x.shape[1]
        if T == self.prefill_chunk:
            return torch.from_numpy(self._decoder_call("prefill", x, pos, int(slots[0])))
        logits = None
        for i in range(T):  # static shapes: a shorter chunk goes token by token
            logits = self._decoder_call("decode", x[:, i : i + 1], pos[:, i : i + 1], int(slots[i]))
        return torch.from_numpy(logits)

    def _decoder_call(self, fn: str, x, pos, start: int) -> np.ndarray:
        from ...host.static_decoder import additive_mask, rotary_cos_sin

        cos, sin = rotary_cos_sin(self.rope, pos)
        feeds = {
            "cos": cos,
            "sin": sin,
            "mask": additive_mask(start, x.shape[1], self.max_context),
            "cache_start": np.array([start], np.int32),
        }
        for label in self.decoder_labels:
            x = self._out(label, fn, {"inputs_embeds": x, **feeds})
        return x

    def _out(self, component: str, fn: str, feeds: dict) -> np.ndarray:
        (value,) = self._run(component, fn, feeds).values()
        return np.asarray(value, dtype=np.float32)

    def close(self) -> None:
        """Nothing to end: the runtime lives in this process."""


class MilRuntime(_PackageRuntime):
    """The bundle's packages executed by the numpy MIL interpreter (Linux)."""

    def __init__(self, bundle: Path, manifest: dict) -> None:
        from .mil import MilInterpreter, MilProgram

        super().__init__(bundle, manifest)
        self.programs = {label: MilProgram(bundle / entry["file"]) for label, entry in self.packages.items()}
        self.interpreters = {label: MilInterpreter(p) for label, p in self.programs.items()}

    def reset(self) -> None:
        for label in self.decoder_labels:
            self.interpreters[label].reset()

    def _run(self, component: str, function: str, feeds: dict) -> dict:
        return self.interpreters[component].run(function, feeds)


class CoreMLPredictRuntime(_PackageRuntime):  # pragma: no cover - needs macOS
    """Core ML's own ``predict`` with states (macOS 15+); the structure checks still read the
    packages with ``MilProgram``."""

    def __init__(self, bundle: Path, manifest: dict) -> None:
        from .mil import MilProgram

        ct = import_coremltools()
        super().__init__(bundle, manifest)
        self.programs = {label: MilProgram(bundle / entry["file"]) for label, entry in self.packages.items()}
        self.models = {}
        for label, entry in self.packages.items():
            for fn in entry["package"]["functions"]:
                kw = {} if fn == "main" else {"function_name": fn}
                self.models[(label, fn)] = ct.models.MLModel(
                    str(bundle / entry["file"]), compute_units=ct.ComputeUnit.CPU_AND_NE, **kw
                )
        self.reset()

    def reset(self) -> None:
        # prefill and decode are functions of one package over the same state: one state object per package
        self.states = {label: self.models[(label, "decode")].make_state() for label in self.decoder_labels}

    def _run(self, component: str, function: str, feeds: dict) -> dict:
        model = self.models[(component, function)]
        if component in self.states:
            return model.predict(feeds, state=self.states[component])
        return model.predict(feeds)
