"""``ChatEngine``: one bundle's runtime with its tokenizer and preprocessing, running
conversations (``host.conversation``) with prefix reuse; what ``run`` and ``serve`` call."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import load_bundle
from .errors import ExportError
from .host.audio import AudioPreprocessing, log_mel
from .host.chat_template import ChatTemplate
from .host.conversation import Detokenizer, check_conversation, hold_back, render
from .host.generate import generate
from .host.messages import Message, Part, Rendered, digest
from .host.sampling import Sampler, SamplingParams
from .opened_bundle import check_verified, open_bundle


@dataclass
class ChatResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens already in the cache: not prefilled again
    finish_reason: str  # stop | length | compute_budget | cancelled
    prefill_s: float
    decode_s: float


class ChatEngine:
    """One bundle's runtime with its tokenizer and preprocessing, remembering what its cache holds.
    Calls are serialised (one KV cache); ``chat`` is safe to call from any one thread at a time."""

    def __init__(
        self,
        bundle: str | Path,
        *,
        allow_failed: bool = False,
        warn: Callable[[str], object] = lambda s: None,
        manifest: dict | None = None,
    ) -> None:
        """``manifest``: one the caller already loaded and checked (``load_bundle``, ``check_verified``)."""
        self.bundle = Path(bundle)
        if manifest is None:
            manifest = load_bundle(self.bundle, trust_stamp=True)
            check_verified(self.bundle, manifest, allow_failed, warn)
        self.manifest, self.runtime, self.tokenizer, self.pre = open_bundle(self.bundle, manifest)
        self.eos = tuple(self.manifest["prompt"]["eos_ids"])
        ap = self.manifest.get("audio_preprocessing")
        self.audio_pre = AudioPreprocessing(**ap) if ap else None
        self.audio_tokens = self.manifest["components"]["audio_encoder"]["outputs"][0]["shape"][0] if ap else None
        self.max_context = self.runtime.max_context
        self.template = None
        name = self.manifest["prompt"].get("chat_template")
        if name is not None:  # listed and hashed like every file a runtime opens (bundle.opened_files)
            path = self.bundle / name
            self.template = ChatTemplate(path.read_text(encoding="utf-8"), path, self.tokenizer)
        self._cached: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def warm_up(self) -> float:
        """Run the text path once (one token, cache slot 0) so that its methods are loaded before the
        first request; seconds taken. XNNPACK packs a method's weights when it loads: 2.1 s at 4
        layers of 9B widths, which the first request would otherwise wait for. Vision methods stay
        lazy: each image bucket packs its own copy of the ViT, paid only by buckets in use. The
        slot written is never read before a prefill rewrites it (slots past the position are masked)."""
        import torch

        t0 = time.perf_counter()
        with self._lock:
            self._cached = []
            emb = self.runtime.token_embedding(torch.tensor([[self.eos[0]]]))
            self.runtime.text_decoder(emb, torch.zeros(3, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return time.perf_counter() - t0

    # -- inputs -----------------------------------------------------------------------------
    def image_part(self, image) -> Part:
        """A PIL image (already EXIF-transposed and RGB, ``host.image.load_image``) as a message part,
        resized into the image bucket closest to it in aspect ratio."""
        x = self.pre.prepare(image)
        return Part("image", data=x.pixels, digest=digest(x.pixels), grid=x.grid, method=x.method)

    def audio_part(self, wave: np.ndarray) -> Part:
        if self.audio_pre is None:
            raise ExportError(
                "this bundle has no audio encoder",
                field="audio",
                fix="export a checkpoint with an audio tower, or send no audio",
            )
        feats = log_mel(wave, self.audio_pre)[None]
        return Part("audio", data=feats, digest=digest(feats))

    def render(self, messages: list[Message], enable_thinking: bool | None = None) -> Rendered:
        if self.template is None:
            return render(self.tokenizer, messages, self.pre.num_tokens, self.audio_tokens, enable_thinking)
        check_conversation(messages)
        return self.template.render(messages, self.pre.num_tokens, self.audio_tokens, enable_thinking)

    # -- generation -------------------------------------------------------------------------
    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop: list[str] = (),
        enable_thinking: bool | None = None,
        on_text: Callable[[str], object] | None = None,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> ChatResult:
        """Answer the conversation. ``on_text`` receives the answer as it grows (never a piece that a
        stop string or a half multi-byte character may still take back); ``cancelled()`` is asked
        after every token; ``deadline`` (``time.monotonic()``) ends generation with
        ``compute_budget``. A prompt that does not fit the context is an error; an answer that
        reaches the end of the context stops with ``length``."""
        r = self.render(messages, enable_thinking)
        n = len(r.prompt)
        if n >= self.max_context:
            raise ExportError(
                "prompt does not fit the bundle's context",
                field="messages",
                expected=f"fewer than {self.max_context} tokens (shapes.max_context of this bundle)",
                got=f"{n:,} tokens",
                fix="drop earlier turns or images, or export with a larger max_context",
            )
        if max_tokens < 1:
            raise ExportError(
                "max_tokens must be at least 1", field="max_tokens", got=str(max_tokens), fix="ask for 1 or more tokens"
            )
        budget = min(max_tokens, self.max_context - n)
        stops = [s for s in stop if s]
        with self._lock:
            return self._generate(r, budget, sampling, stops, on_text, cancelled, deadline)

    def _generate(self, r: Rendered, budget, sampling, stops, on_text, cancelled, deadline) -> ChatResult:
        n = len(r.prompt)
        reuse = 0
        for a, b in zip(
            self._cached, r.keys[: n - 1]
        ):  # the last prompt token always runs: its logits start the answer
            if a != b:
                break
            reuse += 1
        self._cached = []  # until this call completes the cache holds an unknown mix
        answer: list[int] = []
        detok = Detokenizer(self.tokenizer)
        state = {"shown": "", "text": "", "reason": None, "first": None}
        t0 = time.perf_counter()

        def on_token(tok: int) -> None:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            if tok in self.eos:
                state["reason"] = "stop"
                return
            answer.append(tok)
            seen = len(state["text"])
            text = detok.add(tok)
            for s in stops:  # only where the new text can complete a stop string
                at = text.find(s, max(0, seen - len(s) + 1))
                if at >= 0:
                    text = text[:at]
                    state["reason"] = "stop"
            state["text"] = text
            ready = text if state["reason"] else hold_back(text, stops)
            if on_text is not None and len(ready) > len(state["shown"]) and ready.startswith(state["shown"]):
                on_text(ready[len(state["shown"]) :])
                state["shown"] = ready

        def should_stop() -> bool:
            if state["reason"]:
                return True
            if cancelled is not None and cancelled():
                state["reason"] = "cancelled"
                return True
            if deadline is not None and time.monotonic() >= deadline:
                state["reason"] = "compute_budget"
                return True
            return False

        choose = (
            None
            if sampling.greedy and not (sampling.frequency_penalty or sampling.presence_penalty)
            else Sampler(sampling)
        )
        trace = generate(
            self.runtime,
            r.prompt,
            **r.image_inputs(self.pre.merged_grid),
            audios=r.audios,
            max_new_tokens=budget,
            eos_ids=self.eos,
            on_token=on_token,
            reuse=reuse,
            choose=choose,
            stop=should_stop,
        )
        fed = trace.tokens[: trace.cached - n]
        self._cached = r.keys + [(t, "") for t in fed]
        reason = state["reason"] or "length"
        # a multi-byte character the answer ended inside is shown as U+FFFD, as a full decode shows it
        text = state["text"] if reason == "stop" else detok.flush()
        if on_text is not None and len(text) > len(state["shown"]) and text.startswith(state["shown"]):
            on_text(text[len(state["shown"]) :])
        first = state["first"] or time.perf_counter()
        return ChatResult(
            text=text,
            tokens=answer,
            prompt_tokens=n,
            reused_tokens=reuse,
            finish_reason=reason,
            prefill_s=first - t0,
            decode_s=time.perf_counter() - first,
        )
