"""Optional audio tower of a GLM-4.1V checkpoint (GLM-ASR style).

The published AutoGLM-Phone-9B has no audio weights; a checkpoint whose config.json carries an
``audio_config`` gets an ``audio_encoder`` component. Until the audio tower lands, a config that
asks for one is rejected with a clear error instead of being silently exported without it.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError


def parse_audio_config(config: dict, file: Path, text) -> None:
    if config.get("audio_config") is not None:
        raise CheckpointError(
            "audio towers are not supported by this version",
            file=file,
            field="audio_config",
            expected="no audio_config",
            fix="export without the audio tower (remove audio_config) or upgrade autoglm-export",
        )
    return None
