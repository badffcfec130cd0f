"""Chat prompt building: ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|>xN<|end_of_image|>TEXT<|assistant|>\\n``.

The result carries, per token, its modality (0 text, 1 image) because M-RoPE positions and the
embedding scatter both depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEXT, IMAGE = 0, 1


@dataclass
class Prompt:
    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def add(self, ids: list[int], kind: int = TEXT) -> None:
        self.ids += ids
        self.types += [kind] * len(ids)

    def __len__(self) -> int:
        return len(self.ids)


def build_chat_prompt(tokenizer, text: str, image_tokens: int | None = None) -> Prompt:
    """One user turn with an optional image, ready for the assistant's answer."""
    sp = tokenizer.special
    p = Prompt()
    p.add([sp["gmask"], sp["sop"], sp["user"]])
    p.add(tokenizer.encode("\n"))
    if image_tokens:
        p.add([sp["begin_of_image"]])
        p.add([sp["image"]] * image_tokens, IMAGE)
        p.add([sp["end_of_image"]])
    p.add(tokenizer.encode(text))
    p.add([sp["assistant"]])
    p.add(tokenizer.encode("\n"))
    return p
