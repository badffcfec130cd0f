"""The request body of ``POST /v1/chat/completions``: OpenAI's chat fields, plus the extensions the
AutoGLM clients send (``top_k``, ``enable_thinking``, ``return_reasoning``, ``chat_template_kwargs``).

Unknown fields are refused, as OpenAI's API does ("Unrecognized request argument"): a typo such as
``max_token`` silently ignored would change what the client gets without telling it. OpenAI fields
that this server accepts but that change nothing here (``user``, ``metadata``, ``store``…) are
declared last and ignored; those it cannot honour (``n > 1``, ``logprobs``, ``tools``) are refused when
set to anything but their default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class AudioURL(_Strict):
    url: str


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: AudioURL


class InputAudio(_Strict):
    data: str  # base64
    format: Literal["wav", "flac", "ogg", "mp3"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, ImagePart, AudioURLPart, InputAudioPart], Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # sent back by some clients; earlier reasoning is not replayed


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="allow")
    enable_thinking: bool | None = None


class ChatRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=1)
    logprobs: Literal[False] | None = None
    tools: list | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    response_format: dict | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool = False
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # accepted and ignored
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
