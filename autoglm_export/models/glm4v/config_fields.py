"""Typed reads of a checkpoint's JSON config sections (text, vision, audio), each error naming
the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import CheckpointError


class ConfigFields:
    """Typed access to one JSON object with errors that name file and field."""

    def __init__(self, data: dict, file: Path, prefix: str) -> None:
        self.data, self.file, self.prefix = data, file, prefix

    def _err(self, key: str, expected: str, got: Any) -> CheckpointError:
        return CheckpointError(
            "invalid config value",
            file=self.file,
            field=f"{self.prefix}{key}",
            expected=expected,
            got=repr(got),
            fix="correct config.json (compare with the published GLM-4.1V config)",
        )

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        v = self.data.get(key, default)
        if v is None:
            raise CheckpointError(
                "missing config field",
                file=self.file,
                field=f"{self.prefix}{key}",
                expected="an integer",
                fix="add the field to config.json",
            )
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._err(key, f"an integer >= {minimum}", v)
        return v

    def float(self, key: str, default: float | None = None) -> float:
        v = self.data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise self._err(key, "a positive number", v)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            raise self._err(key, "true or false", v)
        return v

    def str(self, key: str, default: str) -> str:
        v = self.data.get(key, default)
        if not isinstance(v, str):
            raise self._err(key, "a string", v)
        return v
