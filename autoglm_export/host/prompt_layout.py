"""The prompt as token pieces the apps assemble (manifest ``prompt.layout``): the checkpoint's chat
template when it has one, else the built-in GLM-4.1V layout, derived and checked at export.

The apps have no jinja. A conversation renders as ``prefix``, then for each message its role's
``before`` tokens, its parts in order (text encoded on its own; an image or clip as its kind's
``before`` tokens, one ``placeholder`` per token of the input, its ``after`` tokens) and its role's
``after`` tokens, then the generation prompt for the thinking switch (``default`` when the request
says nothing, ``on``, ``off``).

Derived by rendering conversations with a sentinel text through the template, then checked: each
probe conversation (system prompt, several turns, images, audio, an answer with its reasoning,
text that starts or ends with spaces or newlines; each thinking switch) must give the same token
ids and modalities through the pieces as through the template (``run`` and ``serve``'s renderer).
A template the pieces cannot express (one that drops earlier reasoning, or treats a turn by its
index) gets no layout and the reason why: the apps then refuse the bundle instead of prompting the
model differently from ``run`` and ``serve``.
"""

from __future__ import annotations

from .messages import ROLES, Message, Part, Rendered
from .prompt import AUDIO, IMAGE, TEXT, Prompt

SENTINEL = "\ue0f0"  # a private-use character: no template writes it, no tokenizer merges it away
THINKING = {"default": None, "on": True, "off": False}
MODALITY = {"image": IMAGE, "audio": AUDIO}
PROBE_AUDIO_TOKENS = 2


class NotExpressible(Exception):
    """The template does something the pieces cannot say; the message says what."""


def prompt_layout(tokenizer, template=None) -> dict:
    """``{"layout": pieces, "layout_unavailable": None}`` or ``{"layout": None, "layout_unavailable": why}``, for the manifest's
    ``prompt`` section. ``template``: a ``chat_template.ChatTemplate``, or None for the built-in layout
    (which ``conversation.render`` assembles from these same pieces)."""
    media = media_kinds(tokenizer)
    if template is None:
        return {"layout": builtin(tokenizer, media), "layout_unavailable": None}
    try:
        pieces = derive(template, tokenizer, media)
        check(pieces, tokenizer, template, media)
    except NotExpressible as e:
        return {"layout": None, "layout_unavailable": str(e)}
    return {"layout": pieces, "layout_unavailable": None}


def media_kinds(tokenizer) -> list[str]:
    """The media the tokenizer has placeholder tokens for."""
    return [m for m in MODALITY if m in tokenizer.special]


def builtin(tokenizer, media: list[str]) -> dict:
    """GLM-4.1V's layout (``conversation.render``, ``run`` and ``serve`` without a template)."""
    sp = tokenizer.special
    newline = tokenizer.encode("\n")
    generation = [sp["assistant"], *newline]
    return {
        "prefix": [sp["gmask"], sp["sop"]],
        "roles": {r: {"before": [sp[r], *newline], "after": []} for r in ROLES if r in sp},  # <|system|> is optional
        "media": {
            m: {"before": [sp[f"begin_of_{m}"]], "placeholder": sp[m], "after": [sp[f"end_of_{m}"]]} for m in media
        },
        "generation": {
            "default": generation,
            "on": generation,
            "off": generation + tokenizer.encode("<think></think>"),
        },
    }


def derive(template, tokenizer, media: list[str]) -> dict:
    """The pieces of ``template`` (a ``ChatTemplate``), read off sentinel renders."""

    def render(messages: list[dict], generation: bool, thinking: bool | None = None) -> str:
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        try:
            return template.template.render(messages=messages, add_generation_prompt=generation, **kwargs)
        except Exception as e:  # a template's own raise_exception, or one that needs other messages
            raise NotExpressible(f"the template fails on a probe conversation: {str(e)[:120]}") from None

    def after_prefix(text: str, what: str) -> str:
        if not text.startswith(prefix):
            raise NotExpressible(f"{what} does not start with the template's prefix {prefix[:40]!r}")
        return text[len(prefix) :]

    def around(text: str, mark: str, what: str) -> tuple[str, str]:
        if text.count(mark) != 1:
            raise NotExpressible(f"{what} writes its content {text.count(mark)} times, not once")
        before, after = text.split(mark)
        return before, after

    ids = template.tokenize
    prefix = render([], False)
    roles, user_before = {}, ""
    for role in ROLES:
        content = [{"type": "text", "text": SENTINEL}] if role == "user" else SENTINEL
        text = after_prefix(render([{"role": role, "content": content}], False), f"a {role} message")
        before, after = around(text, SENTINEL, f"a {role} message")
        roles[role] = {"before": ids(before), "after": ids(after)}
        user_before = before if role == "user" else user_before
    pieces_media = {}
    for m in media:
        content = [{"type": m}, {"type": "text", "text": SENTINEL}]
        text = after_prefix(render([{"role": "user", "content": content}], False), f"a user message with {m}")
        if not text.startswith(user_before):
            raise NotExpressible(f"a user message with {m} starts differently from one with text only")
        written, _ = around(text[len(user_before) :], SENTINEL, f"a user message with {m}")
        before, after = around(written, template.texts[tokenizer.special[m]], f"a user message's {m}")
        pieces_media[m] = {"before": ids(before), "placeholder": tokenizer.special[m], "after": ids(after)}
    generation = {
        key: ids(after_prefix(render([], True, thinking), "the generation prompt"))
        for key, thinking in THINKING.items()
    }
    return {"prefix": ids(prefix), "roles": roles, "media": pieces_media, "generation": generation}


def assemble(
    pieces: dict,
    tokenizer,
    messages: list[Message],
    image_tokens: int | None,
    audio_tokens: int | None,
    thinking: bool | None,
) -> Rendered:
    """``messages`` through the pieces, with each token's modality and prefix-reuse key and the media
    in order: what the apps' ``Conversation.render`` does."""
    out = Rendered(Prompt(), [])

    def add(xs: list[int], kind: int = TEXT, key: str = "") -> None:
        out.prompt.add(xs, kind)
        out.keys.extend((i, key) for i in xs)

    add(pieces["prefix"])
    for m in messages:
        add(pieces["roles"][m.role]["before"])
        for part in m.parts:
            if part.kind == "text":
                add(tokenizer.encode(part.text))
                continue
            md = pieces["media"][part.kind]
            n = part.tokens(image_tokens if part.kind == "image" else audio_tokens)
            add(md["before"])
            add([md["placeholder"]] * n, MODALITY[part.kind], part.digest)
            add(md["after"])
            out.add_media(part)
        add(pieces["roles"][m.role]["after"])
    add(pieces["generation"][next(k for k, v in THINKING.items() if v is thinking)])
    return out


def probes(media: list[str]) -> list[list[Message]]:
    """Conversations the pieces must render as the template does."""

    def media_part(kind: str, n: int) -> Part:
        return Part(kind, grid=(1, n))  # an image's n tokens; a clip's are PROBE_AUDIO_TOKENS

    def text(s: str) -> Part:
        return Part.of_text(s)

    agent = [
        Message.text("system", "You are a phone agent. Answer with do(action=...) or finish(message=...).\n"),
        Message("user", tuple([*(media_part(m, 3) for m in media), text("Open the settings app")])),
        Message.text(
            "assistant", '<think>The icon is top left.</think><answer>do(action="Tap", element=[120, 80])</answer>'
        ),
        Message("user", tuple([*(media_part(m, 2) for m in media[:1]), text("  next screen \n")])),
    ]
    mixed = [
        Message.text("user", "Hello"),
        Message.text("assistant", "Hi!\n"),
        Message(
            "user",
            tuple([text("a"), *(media_part(m, 4) for m in media), text(" b "), *(media_part(m, 1) for m in media[:1])]),
        ),
    ]
    return [agent, mixed, [Message.text("user", " ")], [Message.text("system", "S"), Message.text("user", "\nq")]]


def check(pieces: dict, tokenizer, template, media: list[str]) -> None:
    """Raise ``NotExpressible`` unless every probe renders to the same tokens through the pieces as
    through ``template``."""
    from ..errors import ExportError

    for i, messages in enumerate(probes(media)):
        for key, thinking in THINKING.items():
            try:
                want = template.render(messages, 0, PROBE_AUDIO_TOKENS, thinking).prompt
            except ExportError as e:  # e.g. a template that writes an image placeholder of its own
                raise NotExpressible(f"probe conversation {i} (thinking {key}): {str(e)[:160]}") from None
            got = assemble(pieces, tokenizer, messages, 0, PROBE_AUDIO_TOKENS, thinking).prompt
            ids, types = got.ids, got.types
            if (ids, types) != (want.ids, want.types):
                at = next((j for j, (a, b) in enumerate(zip(ids, want.ids)) if a != b), min(len(ids), len(want.ids)))
                raise NotExpressible(
                    f"probe conversation {i} (thinking {key}) differs from the template at token {at} "
                    f"of {len(want.ids)}: the template does something per turn that fixed pieces cannot"
                )
