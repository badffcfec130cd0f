"""The generation loop every runtime shares: embed -> scatter image tokens -> chunked prefill -> greedy decode.

A ``Runtime`` exposes the bundle's methods (eager PyTorch modules, ExecuTorch, ONNX Runtime ...).
The Android and iOS apps implement the same loop; golden traces from here check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from ..errors import ExportError
from ..methods import VISION_METHOD, is_vision_method
from .positions import decode_positions, mrope_positions
from .prompt import AUDIO, IMAGE, Prompt


class Runtime(Protocol):
    max_context: int
    prefill_chunk: int

    def token_embedding(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def vision_encoder(self, pixel_values: torch.Tensor, method: str = "vision_encoder") -> torch.Tensor: ...
    def audio_encoder(self, input_features: torch.Tensor) -> torch.Tensor: ...
    def text_decoder(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor
    ) -> torch.Tensor: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...  # ends helper processes (the qnn emulator's); nothing for most runtimes


@dataclass
class Trace:
    prompt_ids: list[int]
    positions: np.ndarray
    rope_delta: int
    tokens: list[int] = field(default_factory=list)
    step_logits: list[np.ndarray] = field(default_factory=list)
    image_embeddings: list[np.ndarray] = field(default_factory=list)
    audio_embeddings: list[np.ndarray] = field(default_factory=list)
    cached: int = 0  # cache slots holding this call's tokens when it returned (prompt + tokens fed back)


def _chunks(n: int, size: int, start: int = 0):
    for a in range(start, n, size):
        yield a, min(a + size, n)


def call_component(runtime: Runtime, name: str, x: torch.Tensor) -> torch.Tensor:
    """One component method of ``runtime`` by its manifest name (an image bucket's method included)."""
    if is_vision_method(name):
        return runtime.vision_encoder(x, name)
    return getattr(runtime, name)(x)


def _scatter(
    embeds, prompt: Prompt, kind: int, encoders, inputs, record: list, reuse: int = 0, lengths: list[int] | None = None
) -> None:
    """Encode each image / audio clip (``encoders[j]`` encodes input j) and write the results over its
    placeholder tokens, ``lengths[j]`` of them (equal shares if None); ``embeds`` holds the prompt's
    tokens from ``reuse`` on: an input wholly before it is not encoded again."""
    slots = [i for i, t in enumerate(prompt.types) if t == kind]
    if not inputs:
        return
    if lengths is None:
        if len(slots) % len(inputs):
            raise ValueError(f"{len(slots)} placeholder tokens for {len(inputs)} inputs")
        lengths = [len(slots) // len(inputs)] * len(inputs)
    if sum(lengths) != len(slots) or len(lengths) != len(inputs):
        raise ValueError(f"{len(slots)} placeholder tokens for inputs of {lengths} tokens")
    start = 0
    for j, x in enumerate(inputs):
        per = lengths[j]
        own = slots[start : start + per]
        start += per
        if own[-1] < reuse:
            continue
        f = encoders[j](torch.as_tensor(x, dtype=torch.float32))
        record.append(f.numpy().copy())
        if f.shape[0] != per:
            raise ValueError(f"{f.shape[0]} encoder outputs for {per} placeholder tokens")
        keep = [k for k, i in enumerate(own) if i >= reuse]
        embeds[0, [own[k] - reuse for k in keep]] = f[keep].to(embeds.dtype)


def prefill(
    runtime: Runtime,
    prompt: Prompt,
    images: list[np.ndarray],
    image_grids: list[tuple[int, int]],
    trace: Trace,
    audios: list[np.ndarray] = (),
    reuse: int = 0,
    image_methods: list[str] = (),
):
    """Run the prompt's tokens from ``reuse`` on through the decoder (those before it are already in
    the cache, written by an earlier call with the same tokens, images and clips); logits of the last.
    ``image_methods``: each image's vision method (its bucket); ``vision_encoder`` for all if empty."""
    n = len(prompt)
    ids = torch.tensor(prompt.ids, dtype=torch.long).unsqueeze(0)
    embeds = torch.cat(
        [runtime.token_embedding(ids[:, a:b]) for a, b in _chunks(n, runtime.prefill_chunk, reuse)], dim=1
    )
    methods = list(image_methods) or [VISION_METHOD] * len(images)
    encoders = [lambda x, m=m: runtime.vision_encoder(x, m) for m in methods]
    _scatter(
        embeds, prompt, IMAGE, encoders, images, trace.image_embeddings, reuse, [gh * gw for gh, gw in image_grids]
    )
    if audios:
        _scatter(embeds, prompt, AUDIO, [runtime.audio_encoder] * len(audios), audios, trace.audio_embeddings, reuse)
    pos = torch.from_numpy(trace.positions)
    logits = None
    for a, b in _chunks(n, runtime.prefill_chunk, reuse):
        logits = runtime.text_decoder(
            embeds[:, a - reuse : b - reuse], pos[:, a:b].contiguous(), torch.arange(a, b, dtype=torch.long)
        )
    return logits


def generate(
    runtime: Runtime,
    prompt: Prompt,
    *,
    images: list[np.ndarray] = (),
    image_grids: list[tuple[int, int]] = (),
    image_methods: list[str] = (),
    audios: list[np.ndarray] = (),
    max_new_tokens: int = 32,
    eos_ids: tuple[int, ...] = (),
    force_tokens: list[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    reuse: int = 0,
    choose: Callable[[torch.Tensor, list[int]], int] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Trace:
    """Greedy generation (or ``choose(logits, tokens so far)``, a sampler). With ``force_tokens``
    the loop feeds those tokens (teacher forcing) and records its own argmax at every step, so two
    runtimes can be compared step by step. ``reuse``: how many of the prompt's first tokens the
    cache already holds from the previous call (prefix reuse; 0 starts afresh). ``stop()`` is asked
    after each token (a client gone, a budget spent, a stop string seen)."""
    n = len(prompt)
    if n + max_new_tokens > runtime.max_context:
        raise ExportError(
            "prompt plus new tokens exceed the bundle's context",
            field="--max-new-tokens",
            expected=f"prompt ({n}) + new tokens <= max_context {runtime.max_context}",
            got=str(n + max_new_tokens),
            fix="shorten the prompt, lower --max-new-tokens, or export with a larger max_context",
        )
    if not 0 <= reuse < n:
        raise ValueError(f"reuse {reuse} outside [0, {n}): at least the prompt's last token must run")
    positions, delta = mrope_positions(prompt.types, list(image_grids))
    trace = Trace(prompt_ids=list(prompt.ids), positions=positions, rope_delta=delta)
    if reuse == 0:
        runtime.reset()
    logits = prefill(runtime, prompt, list(images), list(image_grids), trace, list(audios), reuse, list(image_methods))
    cache_index = n
    for step in range(max_new_tokens):
        trace.step_logits.append(logits[0].float().numpy().copy())
        own = int(logits[0].argmax()) if choose is None or force_tokens is not None else choose(logits[0], trace.tokens)
        trace.tokens.append(own)
        if on_token:
            on_token(own)
        fed = force_tokens[step] if force_tokens is not None and step < len(force_tokens) else own
        if force_tokens is None and own in eos_ids:
            break
        if step == max_new_tokens - 1 or (stop is not None and stop()):
            break
        emb = runtime.token_embedding(torch.tensor([[fed]], dtype=torch.long))
        pos = torch.from_numpy(decode_positions(cache_index, delta))
        logits = runtime.text_decoder(emb, pos, torch.tensor([cache_index], dtype=torch.long))
        cache_index += 1
    trace.cached = cache_index
    return trace


class EagerRuntime:
    """The export-ready PyTorch modules themselves: the reference every bundle is checked against."""

    def __init__(self, modules: dict[str, torch.nn.Module], max_context: int, prefill_chunk: int) -> None:
        self.modules = modules
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk

    @torch.no_grad()
    def token_embedding(self, input_ids):
        return self.modules["token_embedding"](input_ids)

    @torch.no_grad()
    def vision_encoder(self, pixel_values, method: str = VISION_METHOD):
        return self.modules[method](pixel_values)

    @torch.no_grad()
    def audio_encoder(self, input_features):
        return self.modules["audio_encoder"](input_features)

    @torch.no_grad()
    def text_decoder(self, embeds, position_ids, cache_position):
        return self.modules["text_decoder"](embeds, position_ids, cache_position)

    def reset(self) -> None:
        self.modules["text_decoder"].reset_cache()
