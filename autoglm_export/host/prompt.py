"""Chat prompt building: ``[gMASK]<sop><|user|>\\n<|begin_of_image|><|image|>xN<|end_of_image|>TEXT<|assistant|>\\n``.

With an audio tower, ``<|begin_of_audio|><|audio|>xM<|end_of_audio|>`` joins the user turn; the
image, audio and text parts may come in any order. The result carries, per token, its modality
(0 text, 1 image, 3 audio) because M-RoPE positions and the embedding scatter depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEXT, IMAGE, AUDIO = 0, 1, 3
DEFAULT_ORDER = ("image", "audio", "text")


@dataclass
class Prompt:
    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def add(self, ids: list[int], kind: int = TEXT) -> None:
        self.ids += ids
        self.types += [kind] * len(ids)

    def __len__(self) -> int:
        return len(self.ids)
