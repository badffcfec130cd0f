"""Images and audio named by a request: ``data:`` URLs, or ``file://`` paths under the one directory
the operator allowed (``--allow-files``). Nothing is fetched over the network: the server may run
next to private services, and a URL in a request must not make it reach them (SSRF)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import ExportError, excerpt

MAX_MEDIA_BYTES = 20 << 20  # one image or clip, decoded; a phone screenshot PNG is ~1-3 MB


class MediaRefused(ExportError):
    """A URL this server does not open, or a data URL that is not base64 (HTTP 400)."""


class MediaTooLarge(ExportError):
    """A request's image or clip is over ``MAX_MEDIA_BYTES`` (HTTP 413)."""


def media_bytes(url: str, field: str, allow_files: Path | None) -> bytes:
    """The bytes a content part's URL names."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaRefused(
                "data URL is not base64",
                field=field,
                expected="data:<type>;base64,<data>",
                got=excerpt(url, 60),
                fix="encode the file as a base64 data URL",
            )
        return b64(payload, field)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        if allow_files is None:
            raise MediaRefused(
                "file:// URLs are off on this server",
                field=field,
                got=excerpt(url, 60),
                fix="send a data: URL, or start the server with --allow-files DIR",
            )
        path = Path(unquote(urlparse(url).path)).resolve()
        root = allow_files.resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise MediaRefused(
                "file:// URL outside the allowed directory or not a file",
                field=field,
                got=excerpt(url, 60),
                expected=f"a file under {root}",
                fix="send a data: URL, or a file under --allow-files",
            )
        if path.stat().st_size > MAX_MEDIA_BYTES:
            raise MediaTooLarge(
                "file too large",
                field=field,
                expected=f"at most {MAX_MEDIA_BYTES:,} bytes",
                got=f"{path.stat().st_size:,} bytes",
                fix="downscale or trim it",
            )
        return path.read_bytes()
    raise MediaRefused(
        "only data: URLs (and file:// under --allow-files) are accepted; nothing is fetched",
        field=field,
        got=excerpt(url, 60),
        fix="download the file and send it as a base64 data: URL",
    )


def b64(payload: str, field: str) -> bytes:
    if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise MediaTooLarge(
            "image or audio too large",
            field=field,
            expected=f"at most {MAX_MEDIA_BYTES:,} bytes",
            got=f"~{len(payload) * 3 // 4:,} bytes",
            fix="downscale or trim it",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused(
            "invalid base64", field=field, got=excerpt(payload, 40), fix="send standard base64 (RFC 4648)"
        ) from None
