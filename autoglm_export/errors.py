"""User-facing errors.

Every mistake a user can make (bad checkpoint, bad recipe, existing output, corrupted bundle)
becomes an ``ExportError`` whose text is one line naming the file, the field, what was expected
and what to do. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

# What an error quotes of rejected input is bounded: a hostile value (a 500 MB YAML expansion, a
# megabyte-long shard name) must not become a 500 MB "one-line" message.
EXCERPT_CHARS = 120
MAX_LINE_CHARS = 4000


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as text, cut to ``limit`` characters with the full length said."""
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


class ExportError(Exception):
    """A problem the user can fix; rendered as a single line."""

    exit_code = 2

    def __init__(
        self,
        what: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        expected: str | None = None,
        got: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.field = field
        self.what = what
        self.expected = expected
        self.got = got
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ": ".join(excerpt(p, 400) for p in (self.file, self.field) if p)
        parts = [f"{where}: {self.what}" if where else self.what]
        if self.expected is not None:
            parts.append(f"expected {excerpt(self.expected, 400)}")
        if self.got is not None:
            parts.append(f"got {excerpt(self.got)}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return excerpt("; ".join(parts).replace("\n", " "), MAX_LINE_CHARS)


class CheckpointError(ExportError):
    """The checkpoint directory is missing, malformed or does not match its config."""


class RecipeError(ExportError):
    """A recipe file failed validation (possibly several problems at once)."""

    def __init__(self, file: str | Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s): " + " | ".join(problems),
            file=file,
            fix="edit the recipe; `autoglm-export recipes validate FILE` re-checks it",
        )


class BundleError(ExportError):
    """A bundle is missing files, has a bad manifest or fails its hash check."""


class BackendUnavailable(ExportError):
    """A target's toolchain cannot run on this machine; says what to install."""


class VerificationFailed(ExportError):
    """A parity gate failed: names the component and the figure."""

    exit_code = 1
