"""Multi-turn conversations rendered to prompts, answers decoded and split: the library under
``chat_engine.ChatEngine`` (``run`` and ``serve``).

A conversation is a list of ``Message`` (system / user / assistant), each a list of parts: text,
images and audio clips, in order (each image resized into the bundle's image bucket closest to it
in aspect ratio: N image tokens follow its bucket). It is rendered in GLM-4.1V's chat layout::

    [gMASK]<sop><|system|>\\nSYSTEM<|user|>\\n<|begin_of_image|><|image|>xN<|end_of_image|>TEXT<|assistant|>\\nANSWER<|user|>\\n...<|assistant|>\\n

(the checkpoint's ``chat_template.jinja``: each role token, then a newline and the content;
``enable_thinking=False`` appends ``<think></think>`` to the generation prompt, as GLM-4.5V's
template does, so the model answers without reasoning).
"""

from __future__ import annotations

from ..errors import ExportError
from .messages import ROLES, Message, Part, Rendered
from .prompt import DEFAULT_ORDER, Prompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def render(
    tokenizer, messages: list[Message], image_tokens: int, audio_tokens: int | None, enable_thinking: bool | None = None
) -> Rendered:
    """The conversation as prompt tokens ending in the assistant's turn (see the module docstring):
    the built-in layout's pieces, assembled as the apps assemble a bundle's ``prompt.layout``."""
    from .prompt_layout import assemble, builtin, media_kinds

    check_conversation(messages)
    no_audio = audio_tokens is None or "audio" not in tokenizer.special
    for i, m in enumerate(messages):
        if no_audio and any(part.kind == "audio" for part in m.parts):
            raise ExportError(
                "this bundle has no audio encoder",
                field=f"messages[{i}].content",
                fix="export a checkpoint with an audio tower, or send no audio",
            )
    pieces = builtin(tokenizer, media_kinds(tokenizer))
    return assemble(pieces, tokenizer, messages, image_tokens, audio_tokens, enable_thinking)


def build_chat_prompt(
    tokenizer,
    text: str,
    image_tokens: int | None = None,
    audio_tokens: int | None = None,
    order: tuple[str, ...] = DEFAULT_ORDER,
) -> Prompt:
    """One user turn with an optional image and audio clip, ready for the assistant's answer: the
    built-in layout's conversation of that one message (``conversation.render``)."""
    parts = []
    for kind in order:
        if kind == "image" and image_tokens:
            parts.append(Part("image"))
        elif kind == "audio" and audio_tokens:
            parts.append(Part("audio"))
        elif kind == "text":
            parts.append(Part.of_text(text))
    return render(tokenizer, [Message("user", tuple(parts))], image_tokens, audio_tokens).prompt


def check_conversation(messages: list[Message]) -> None:
    if not messages:
        raise ExportError(
            "empty conversation", field="messages", expected="at least one message", fix="send a user message"
        )
    if messages[-1].role == "assistant":
        raise ExportError(
            "the last message is the assistant's",
            field="messages[-1].role",
            expected="system or user",
            fix="end the conversation with the user's turn",
        )
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ExportError(
                "unknown role",
                field=f"messages[{i}].role",
                expected=" | ".join(ROLES),
                got=m.role,
                fix="use system, user or assistant",
            )
        if m.role != "user" and any(part.kind != "text" for part in m.parts):
            raise ExportError(
                "only user turns carry images or audio",
                field=f"messages[{i}].content",
                fix="move the image or audio into a user message",
            )


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
            body = hold_back(body, [THINK_CLOSE])
        return body, ""
    return body[:end], body[end + len(THINK_CLOSE) :]


def hold_back(text: str, stops: list[str]) -> str:
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
