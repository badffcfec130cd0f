"""A checkpoint's own chat template (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``), rendered and tokenized as transformers' ``apply_chat_template`` does.

Rendering: jinja2's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks`` and the globals
transformers provides (``raise_exception``, ``tojson``); a template is data from the checkpoint,
so it runs sandboxed: no attribute access to Python internals, no file or network access.

Tokenizing: the rendered text is split at the tokenizer's special tokens, each becoming its id,
and the text between them is encoded on its own, which is what a Hugging Face tokenizer does with
added tokens. One difference on purpose: special-token text *inside a message* (a user typing
``<|assistant|>``) stays text, as in ``run`` (#29); it is swapped for private-use markers while
the template renders and restored afterwards. Each ``<|image|>`` / ``<|audio|>`` the template
writes stands for one image or clip of the messages, in order, and is expanded to that input's
tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, ExportError, excerpt

TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 256 << 10


def find_chat_template(root: Path) -> str | None:
    """The checkpoint's chat template text, or None when it has none."""
    from ..checkpoint import checked_file

    path = root / TEMPLATE_FILE
    if path.is_file():
        checked_file(root, path, TEMPLATE_FILE)
        return _read(path)
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    checked_file(root, config, "tokenizer_config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            "tokenizer_config.json is not JSON",
            file=config,
            got=excerpt(str(e)),
            fix="copy tokenizer_config.json from the original checkpoint",
        ) from None
    t = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if t is None:
        return None
    if not isinstance(t, str) or len(t.encode()) > MAX_TEMPLATE_BYTES:
        raise CheckpointError(
            "chat_template is not a template",
            file=config,
            field="chat_template",
            expected=f"a string of at most {MAX_TEMPLATE_BYTES:,} bytes",
            got=excerpt(repr(t)[:200]),
            fix="copy tokenizer_config.json from the original checkpoint",
        )
    return t


def _read(path: Path) -> str:
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise CheckpointError(
            "chat template too large",
            file=path,
            expected=f"at most {MAX_TEMPLATE_BYTES:,} bytes",
            fix="use the template that ships with the checkpoint",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(
            "chat template is not UTF-8", file=path, fix="use the template that ships with the checkpoint"
        ) from None


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"


_MARKER = re.compile("\ue000(\\d+)\ue001")


class ChatTemplate:
    """A compiled template with what rendering needs of the tokenizer, prepared once per bundle
    (the special tokens, their escape markers and the pattern that splits at them)."""

    def __init__(self, source: str, file: str | Path, tokenizer) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ExportError(
                "chat template does not compile",
                file=file,
                got=excerpt(str(e)),
                fix="use the template that ships with the checkpoint",
            ) from None
        self.file = file
        self.tokenizer = tokenizer
        self.ids = _special_texts(tokenizer)
        self.texts = {i: t for t, i in self.ids.items()}  # a marker holds its special token's id
        self.specials = SpecialTexts(self.ids)

    def _hide(self, text: str) -> str:
        return "".join(_marker(self.ids[piece]) if special else piece for piece, special in self.specials.split(text))

    def _unhide(self, text: str) -> str:
        return _MARKER.sub(lambda m: self.texts[int(m.group(1))], text)

    def render(self, messages, image_tokens: int, audio_tokens: int | None, enable_thinking: bool | None):
        """``conversation.render``'s result for ``messages`` (host.conversation.Message) through the template."""
        from jinja2 import TemplateError

        from .messages import Rendered
        from .prompt import AUDIO, IMAGE, Prompt

        hf, media = [], []
        for m in messages:
            content = []
            for part in m.parts:
                if part.kind == "text":
                    content.append({"type": "text", "text": self._hide(part.text)})
                else:
                    content.append({"type": part.kind})
                    media.append(part)
            if m.role != "user" and all(c["type"] == "text" for c in content):
                content = "".join(c["text"] for c in content)  # what templates expect of system/assistant turns
            hf.append({"role": m.role, "content": content})
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        try:
            text = self.template.render(messages=hf, add_generation_prompt=True, **kwargs)
        except TemplateError as e:
            raise ExportError(
                "chat template failed on this conversation",
                file=self.file,
                got=excerpt(str(e)),
                fix="check the messages' roles and order",
            ) from None
        sp = self.tokenizer.special
        placeholder = {sp["image"]: ("image", IMAGE, image_tokens)}
        if "audio" in sp and audio_tokens:
            placeholder[sp["audio"]] = ("audio", AUDIO, audio_tokens)
        p = Prompt()
        out = Rendered(p, [])
        queue = list(media)
        for piece, tid in self._split(text):
            if tid is None:
                ids = self.tokenizer.encode(self._unhide(piece))
                p.add(ids)
                out.keys.extend((i, "") for i in ids)
            elif tid in placeholder:
                kind, modality, n = placeholder[tid]
                if not queue or queue[0].kind != kind:
                    raise ExportError(
                        f"chat template wrote an {kind} placeholder the messages do not fill",
                        file=self.file,
                        fix="use the template that ships with the checkpoint",
                    )
                part = queue.pop(0)
                n = part.tokens(n)
                p.add([tid] * n, modality)
                out.keys.extend((tid, part.digest) for _ in range(n))
                out.add_media(part)
            else:
                p.add([tid])
                out.keys.append((tid, ""))
        if queue:
            raise ExportError(
                f"chat template has no place for {len(queue)} image(s)/clip(s) of the messages",
                file=self.file,
                fix="use a template that renders image and audio parts",
            )
        return out

    def tokenize(self, text: str) -> list[int]:
        """The ids of ``text`` as the template's output is tokenized: special-token text as its id,
        the rest encoded (no placeholder expansion)."""
        out: list[int] = []
        for piece, tid in self._split(text):
            out += [tid] if tid is not None else self.tokenizer.encode(piece)
        return out

    def _split(self, text: str):
        """(piece, None) for text and (special, id) for each special token, in order."""
        for piece, special in self.specials.split(text):
            yield piece, self.ids[piece] if special else None


class SpecialTexts:
    """Finds special-token texts in a string, leftmost and longest first, in time that follows the
    text and the number of distinct special lengths, not the number of specials: a tokenizer padded
    with 150,965 special fillers (the synthetic 9B-shape one) took 10 s to compile into one regex
    alternation, and every message part paid one ``str.replace`` per special."""

    def __init__(self, texts) -> None:
        self.texts = set(texts)
        self.lengths = sorted({len(t) for t in self.texts}, reverse=True)
        firsts = {t[0] for t in self.texts}
        self.starts = re.compile("[" + "".join(re.escape(c) for c in sorted(firsts)) + "]") if firsts else None

    def split(self, text: str):
        """(piece, is_special) in order; the pieces join to ``text``."""
        at = i = 0
        while self.starts is not None and (m := self.starts.search(text, i)):
            i = m.start()
            hit = next((n for n in self.lengths if i + n <= len(text) and text[i : i + n] in self.texts), 0)
            if not hit:
                i += 1
                continue
            if i > at:
                yield text[at:i], False
            yield text[i : i + hit], True
            at = i = i + hit
        if at < len(text):
            yield text[at:], False


def _special_texts(tokenizer) -> dict[str, int]:
    """The text and id of every special added token (GLM's role, image and audio tokens among them)."""
    return {tok.content: tid for tid, tok in tokenizer.tok.get_added_tokens_decoder().items() if tok.special}
