"""Multi-turn chat on a bundle: the library under ``run`` and ``serve``.

A conversation is a list of ``Message`` (system / user / assistant), each a list of parts: text,
images and audio clips, in order (each image resized into the bundle's image bucket closest to it
in aspect ratio: N image tokens follow its bucket). It is rendered in GLM-4.1V's chat layout::

    [gMASK]<sop><|system|>\\nSYSTEM<|user|>\\n<|begin_of_image|><|image|>xN<|end_of_image|>TEXT<|assistant|>\\nANSWER<|user|>\\n...<|assistant|>\\n

(the checkpoint's ``chat_template.jinja``: each role token, then a newline and the content;
``enable_thinking=False`` appends ``<think></think>`` to the generation prompt, as GLM-4.5V's
template does, so the model answers without reasoning).

**Prefix reuse.** The engine remembers which tokens its KV cache holds, each keyed by its id and,
for image and audio tokens, by the digest of the pixels or features they came from. A request
whose prompt starts with the same keys prefills only the rest: in an agent loop turn N runs the
new user turn (and whatever changed earlier: a dropped screenshot invalidates from there on).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ExportError
from .prompt import AUDIO, IMAGE, Prompt
from .sampling import Sampler, SamplingParams

ROLES = ("system", "user", "assistant")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Part:
    kind: str  # "text" | "image" | "audio"
    text: str = ""
    data: np.ndarray | None = None  # preprocessed pixels or log-mel features
    digest: str = ""
    grid: tuple[int, int] | None = None  # an image's merged grid (its bucket's): grid[0] * grid[1] image tokens
    method: str = "vision_encoder"  # an image's vision method (its bucket's)

    def tokens(self, default: int | None) -> int | None:
        return self.grid[0] * self.grid[1] if self.kind == "image" and self.grid else default

    @classmethod
    def of_text(cls, text: str) -> "Part":
        return cls("text", text=text)


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[Part, ...]

    @classmethod
    def text(cls, role: str, text: str) -> "Message":
        return cls(role, (Part.of_text(text),))


@dataclass
class Rendered:
    prompt: Prompt
    keys: list[tuple[int, str]]  # per token: (id, digest of the image/clip it stands for, or "")
    images: list[np.ndarray] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    image_parts: list[Part] = field(default_factory=list)

    def add_media(self, part: Part) -> None:
        (self.images if part.kind == "image" else self.audios).append(part.data)
        if part.kind == "image":
            self.image_parts.append(part)

    def image_inputs(self, default_grid: tuple[int, int]) -> dict:
        """``generate``'s image arguments: each image's grid and vision method."""
        return {"images": self.images, "image_grids": [p.grid or default_grid for p in self.image_parts],
                "image_methods": [p.method for p in self.image_parts]}


@dataclass
class ChatResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens already in the cache: not prefilled again
    finish_reason: str  # stop | length | compute_budget | cancelled
    prefill_s: float
    decode_s: float


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


def render(tokenizer, messages: list[Message], image_tokens: int, audio_tokens: int | None,
           enable_thinking: bool | None = None) -> Rendered:  # fmt: skip
    """The conversation as prompt tokens ending in the assistant's turn (see the module docstring)."""
    sp = tokenizer.special
    check_conversation(messages)
    p = Prompt()
    keys: list[tuple[int, str]] = []
    out = Rendered(p, keys)

    def add(ids: list[int], kind: int = 0, key: str = "") -> None:
        p.add(ids, kind)
        keys.extend((i, key) for i in ids)

    newline = tokenizer.encode("\n")
    add([sp["gmask"], sp["sop"]])
    for i, m in enumerate(messages):
        add([sp[m.role]])
        add(newline)
        for part in m.parts:
            if part.kind == "text":
                add(tokenizer.encode(part.text))
            elif part.kind == "image":
                add([sp["begin_of_image"]])
                add([sp["image"]] * part.tokens(image_tokens), IMAGE, part.digest)
                add([sp["end_of_image"]])
                out.add_media(part)
            elif part.kind == "audio":
                if audio_tokens is None or "audio" not in sp:
                    raise ExportError("this bundle has no audio encoder", field=f"messages[{i}].content",
                                      fix="export a checkpoint with an audio tower, or send no audio")  # fmt: skip
                add([sp["begin_of_audio"]])
                add([sp["audio"]] * audio_tokens, AUDIO, part.digest)
                add([sp["end_of_audio"]])
                out.add_media(part)
    add([sp["assistant"]])
    add(newline)
    if enable_thinking is False:
        add(tokenizer.encode(THINK_OPEN + THINK_CLOSE))
    return out


def check_conversation(messages: list[Message]) -> None:
    if not messages:
        raise ExportError("empty conversation", field="messages", expected="at least one message", fix="send a user message")
    if messages[-1].role == "assistant":
        raise ExportError("the last message is the assistant's", field="messages[-1].role", expected="system or user",
                          fix="end the conversation with the user's turn")  # fmt: skip
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ExportError("unknown role", field=f"messages[{i}].role", expected=" | ".join(ROLES), got=m.role,
                              fix="use system, user or assistant")  # fmt: skip
        if m.role != "user" and any(part.kind != "text" for part in m.parts):
            raise ExportError("only user turns carry images or audio", field=f"messages[{i}].content",
                              fix="move the image or audio into a user message")  # fmt: skip


def split_reasoning(text: str, final: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a GLM reply ``<think>R</think>A``; no think block: ("", text). While
    streaming (``final`` false) a half-written ``<think>``/``</think>`` at the end is held back."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        if not final and THINK_OPEN.startswith(stripped):
            return "", ""  # maybe the start of <think>
        return "", text
    body = stripped[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    if end < 0:
        if not final:
            body = _hold_back(body, [THINK_CLOSE])
        return body, ""
    return body[:end], body[end + len(THINK_CLOSE) :]


def _hold_back(text: str, stops: list[str]) -> str:
    """``text`` without a tail that could still grow into one of ``stops``."""
    cut = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = max(cut, k)
                break
    return text[: len(text) - cut] if cut else text


class Detokenizer:
    """The text of a growing answer, decoding a few tokens per step instead of the whole answer
    (vLLM's prefix/read offsets): text is committed once it does not end inside a multi-byte
    character, and the decode window restarts where the last commit ended."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """The text with any uncommitted tail (an unfinished character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        return self.text + self.tokenizer.decode(self.ids[self.prefix :])[len(before) :]


class ChatEngine:
    """One bundle's runtime with its tokenizer and preprocessing, remembering what its cache holds.
    Calls are serialised (one KV cache); ``chat`` is safe to call from any one thread at a time."""

    def __init__(self, bundle: str | Path, *, allow_failed: bool = False, warn: Callable[[str], object] = lambda s: None,
                 manifest: dict | None = None) -> None:  # fmt: skip
        """``manifest``: one the caller already loaded and checked (``load_bundle``, ``check_verified``)."""
        from ..bundle import load_bundle
        from ..runner import check_verified, open_bundle
        from .audio import AudioPreprocessing

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
            from .chat_template import ChatTemplate

            path = self.bundle / name
            self.template = ChatTemplate(path.read_text(encoding="utf-8"), path, self.tokenizer)
        self._cached: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    # -- inputs -----------------------------------------------------------------------------
    def image_part(self, image) -> Part:
        """A PIL image (already EXIF-transposed and RGB, ``host.image.load_image``) as a message part,
        resized into the image bucket closest to it in aspect ratio."""
        x = self.pre.prepare(image)
        return Part("image", data=x.pixels, digest=digest(x.pixels), grid=x.grid, method=x.method)

    def audio_part(self, wave: np.ndarray) -> Part:
        from .audio import log_mel

        if self.audio_pre is None:
            raise ExportError("this bundle has no audio encoder", field="audio", fix="export a checkpoint with an audio tower, or send no audio")
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
            raise ExportError("prompt does not fit the bundle's context", field="messages",
                              expected=f"fewer than {self.max_context} tokens (shapes.max_context of this bundle)",
                              got=f"{n:,} tokens", fix="drop earlier turns or images, or export with a larger max_context")  # fmt: skip
        if max_tokens < 1:
            raise ExportError("max_tokens must be at least 1", field="max_tokens", got=str(max_tokens), fix="ask for 1 or more tokens")
        budget = min(max_tokens, self.max_context - n)
        stops = [s for s in stop if s]
        with self._lock:
            return self._generate(r, budget, sampling, stops, on_text, cancelled, deadline)

    def _generate(self, r: Rendered, budget, sampling, stops, on_text, cancelled, deadline) -> ChatResult:
        from .generate import generate

        n = len(r.prompt)
        reuse = 0
        for a, b in zip(self._cached, r.keys[: n - 1]):  # the last prompt token always runs: its logits start the answer
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
            ready = text if state["reason"] else _hold_back(text, stops)
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

        choose = None if sampling.greedy and not (sampling.frequency_penalty or sampling.presence_penalty) else Sampler(sampling)
        trace = generate(self.runtime, r.prompt, **r.image_inputs(self.pre.merged_grid), audios=r.audios,
                         max_new_tokens=budget, eos_ids=self.eos, on_token=on_token, reuse=reuse,
                         choose=choose, stop=should_stop)  # fmt: skip
        fed = trace.tokens[: trace.cached - n]
        self._cached = r.keys + [(t, "") for t in fed]
        reason = state["reason"] or "length"
        # a multi-byte character the answer ended inside is shown as U+FFFD, as a full decode shows it
        text = state["text"] if reason == "stop" else detok.flush()
        if on_text is not None and len(text) > len(state["shown"]) and text.startswith(state["shown"]):
            on_text(text[len(state["shown"]) :])
        first = state["first"] or time.perf_counter()
        return ChatResult(text=text, tokens=answer, prompt_tokens=n, reused_tokens=reuse, finish_reason=reason,
                          prefill_s=first - t0, decode_s=time.perf_counter() - first)  # fmt: skip
