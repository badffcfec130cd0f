"""tokenizer.json access with the GLM chat special tokens resolved by name and checked."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..models.glm4v.spec import SPECIAL_TOKEN_NAMES, TokenSpec

REQUIRED = ("gmask", "sop", "user", "assistant", "begin_of_image", "end_of_image", "image")


class ChatTokenizer:
    def __init__(self, path: Path, tokens: TokenSpec, audio=None) -> None:
        from tokenizers import Tokenizer

        if not Path(path).is_file():
            raise CheckpointError(
                "missing tokenizer", file=path, fix="copy tokenizer.json from the original checkpoint"
            )
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad JSON
            raise CheckpointError(
                f"tokenizer.json cannot be read ({str(e).splitlines()[0][:120]})",
                file=path,
                fix="copy tokenizer.json from the original checkpoint",
            ) from None
        # special-token text inside user text is encoded as text ("<|user|>" typed in a prompt must
        # not open a turn); the prompt builder inserts special ids itself
        self.tok.encode_special_tokens = True
        self.path = Path(path)
        self.special: dict[str, int] = {}
        for name, text in SPECIAL_TOKEN_NAMES.items():
            tid = self.tok.token_to_id(text)
            if tid is not None:
                self.special[name] = tid
        missing = [SPECIAL_TOKEN_NAMES[n] for n in REQUIRED if n not in self.special]
        if missing:
            raise CheckpointError(
                "tokenizer lacks GLM chat special tokens",
                file=path,
                field="added_tokens",
                expected=", ".join(missing),
                fix="use the tokenizer.json that ships with the checkpoint",
            )
        for name, cfg_id in (
            ("image", tokens.image_token_id),
            ("begin_of_image", tokens.image_start_token_id),
            ("end_of_image", tokens.image_end_token_id),
        ):
            if self.special[name] != cfg_id:
                raise CheckpointError(
                    "tokenizer and config.json disagree on a special token id",
                    file=path,
                    field=SPECIAL_TOKEN_NAMES[name],
                    expected=f"id {cfg_id} (config.json)",
                    got=f"id {self.special[name]}",
                    fix="use the tokenizer.json that ships with the checkpoint",
                )

        if audio is not None:
            for name, cfg_id in (
                ("audio", audio.audio_token_id),
                ("begin_of_audio", audio.audio_start_token_id),
                ("end_of_audio", audio.audio_end_token_id),
            ):
                if self.tok.id_to_token(cfg_id) is None:
                    raise CheckpointError(
                        "audio token id from config.json is not in the tokenizer",
                        file=path,
                        field=name,
                        got=str(cfg_id),
                        fix="use the tokenizer that ships with the checkpoint",
                    )
                self.special[name] = cfg_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
