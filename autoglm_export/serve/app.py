"""``autoglm-export serve``: an OpenAI-compatible chat service on one bundle (FastAPI + uvicorn).

One model instance answers one request at a time (one KV cache, reused across requests that share
a prefix); requests wait in a bounded queue and get 429 beyond it. Generation runs on a worker
thread; the event loop only parses, queues and streams, so a client that disconnects stops its
generation at the next token. Every rejected request gets OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with 400 (bad request), 404 (unknown model),
413 (too large), 422 (content that cannot be processed) or 429 (queue full) — never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ExportError, excerpt
from ..chat_engine import ChatEngine, ChatResult
from ..host.conversation import split_reasoning
from ..host.messages import Message, Part
from ..host.sampling import SamplingParams
from ..targets.shared.memory_fit import resident_bytes
from .media import MediaRefused, MediaTooLarge, b64, media_bytes
from .schema import ChatMessage, ChatRequest

MAX_BODY_BYTES = 64 << 20  # a 10-screenshot agent history in base64 is ~30 MB
QUALITY_PRESETS = {
    # X-Output-Quality: fills in what the request leaves unset (documented in docs/serve.md)
    "speed": {"temperature": 0.0, "enable_thinking": False},
    "balanced": {},
    "quality": {"enable_thinking": True},
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _from_export_error(e: ExportError, status: int = 400) -> ApiError:
    """``status`` unless the error's class says more: a URL refused is 400, media too large 413."""
    status = 413 if isinstance(e, MediaTooLarge) else 400 if isinstance(e, MediaRefused) else status
    return ApiError(status, e.one_line(), param=e.field, code=type(e).__name__)


class Service:
    """The model instance, its queue and what the endpoints need to know about the bundle."""

    def __init__(self, engine: ChatEngine, *, model_name: str, allow_files: Path | None, max_queue: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.allow_files = allow_files
        self.max_queue = max_queue
        self.pending = 0  # requests admitted and not finished (only touched on the event loop)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoglm-generate")
        self.created = int(time.time())
        # what running this bundle takes: the files the runtime maps, or this process's resident memory
        # with the bundle loaded, whichever is larger (declared / measured)
        files = sum(f.stat().st_size for f in engine.bundle.rglob("*") if f.is_file())
        self.memory_need_mb = max(files, resident_bytes()) / 2**20


def request_messages(req: ChatRequest, engine: ChatEngine, allow_files: Path | None) -> list[Message]:
    """A request's messages as the conversation runtime's, images and clips decoded and preprocessed."""
    return [
        Message("system" if m.role == "developer" else m.role, tuple(_parts(m, i, engine, allow_files)))
        for i, m in enumerate(req.messages)
    ]


def _parts(m: ChatMessage, i: int, engine: ChatEngine, allow_files: Path | None):
    from ..host.audio import decode_audio
    from ..host.image import decode_image

    if m.content is None or isinstance(m.content, str):
        yield Part.of_text(m.content or "")
        return
    for j, part in enumerate(m.content):
        field = f"messages[{i}].content[{j}]"
        if part.type == "text":
            yield Part.of_text(part.text)
        elif part.type == "image_url":
            data = media_bytes(part.image_url.url, f"{field}.image_url.url", allow_files)
            yield engine.image_part(decode_image(data, field=f"{field}.image_url"))
        else:
            if engine.audio_pre is None:
                raise ExportError(
                    "this bundle has no audio encoder",
                    field=field,
                    fix="send no audio, or serve a bundle with an audio tower",
                )
            if part.type == "audio_url":
                data = media_bytes(part.audio_url.url, f"{field}.audio_url.url", allow_files)
            else:
                data = b64(part.input_audio.data, f"{field}.input_audio.data")
            yield engine.audio_part(decode_audio(data, engine.audio_pre, field=field))


def _settings(req: ChatRequest, headers) -> tuple[dict, float | None]:
    """Generation settings from the body and the X- headers; the compute deadline (monotonic)."""
    start = time.monotonic()
    quality = headers.get("x-output-quality")
    preset = {}
    if quality is not None:
        preset = QUALITY_PRESETS.get(quality.strip().lower())
        if preset is None:
            raise ApiError(
                400,
                f"X-Output-Quality must be one of {', '.join(QUALITY_PRESETS)}; got {excerpt(quality, 40)}",
                param="X-Output-Quality",
                code="invalid_header",
            )
    budget = headers.get("x-compute-budget-ms")
    deadline = None
    if budget is not None:
        try:
            ms = float(budget)
            if not 0 < ms < 1e9:
                raise ValueError
        except ValueError:
            raise ApiError(
                400,
                f"X-Compute-Budget-MS must be a positive number of milliseconds; got {excerpt(budget, 40)}",
                param="X-Compute-Budget-MS",
                code="invalid_header",
            ) from None
        deadline = start + ms / 1000
    thinking = req.enable_thinking
    if thinking is None and req.chat_template_kwargs is not None:
        thinking = req.chat_template_kwargs.enable_thinking
    if thinking is None:
        thinking = preset.get("enable_thinking")
    temperature = req.temperature if req.temperature is not None else preset.get("temperature", 0.0)
    sampling = SamplingParams(
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else 1.0,
        top_k=req.top_k or 0,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        seed=req.seed,
    )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(len(s) > 200 for s in stop):
        raise ApiError(400, "stop takes at most 4 strings of at most 200 characters", param="stop")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise ApiError(400, 'only response_format {"type": "text"} is supported', param="response_format")
    max_tokens = req.max_completion_tokens or req.max_tokens
    return {
        "sampling": sampling,
        "stop": stop,
        "enable_thinking": thinking,
        "max_tokens": max_tokens or 1 << 30,
    }, deadline


def create_app(
    engine: ChatEngine,
    *,
    model_name: str = "autoglm-phone-9b",
    allow_files: Path | None = None,
    max_queue: int = 8,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    svc = Service(engine, model_name=model_name, allow_files=allow_files, max_queue=max_queue)
    app = FastAPI(
        title="autoglm-export serve",
        version="1",
        description=f"OpenAI-compatible chat completions on the bundle {engine.bundle.name} "
        f"({engine.manifest['target']}, max_context {engine.max_context}).",
    )
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception):  # a bug here must not leak a traceback to the client
        import logging

        logging.getLogger("autoglm_export.serve").exception("request failed")
        return JSONResponse(
            ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").body(), status_code=500
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": svc.model_name,
            "target": engine.manifest["target"],
            "max_context": engine.max_context,
            "queued": svc.pending,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "autoglm-export"}],
        }

    _document_request_body(app)

    @app.post(
        "/v1/chat/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
            }
        },
    )
    async def chat_completions(request: Request):
        req = await _read_request(request, max_body_bytes)
        if req.model != svc.model_name:
            raise ApiError(
                404,
                f"model {excerpt(req.model, 60)!r} is not served here; this server has {svc.model_name!r}",
                param="model",
                code="model_not_found",
            )
        limit = request.headers.get("x-memory-limit-mb")
        if limit is not None:
            try:
                limit_mb = float(limit)
            except ValueError:
                raise ApiError(
                    400,
                    f"X-Memory-Limit-MB must be a number; got {excerpt(limit, 40)}",
                    param="X-Memory-Limit-MB",
                    code="invalid_header",
                ) from None
            if limit_mb < svc.memory_need_mb:
                raise ApiError(
                    422,
                    f"this bundle needs {svc.memory_need_mb:,.0f} MB (its files or the server's resident memory, "
                    f"whichever is larger); X-Memory-Limit-MB allows {limit_mb:,.0f}",
                    param="X-Memory-Limit-MB",
                    code="memory_limit_exceeded",
                )
        settings, deadline = _settings(req, request.headers)
        if svc.pending >= svc.max_queue:
            raise ApiError(
                429,
                f"{svc.pending} requests are already waiting for the model; retry later",
                code="queue_full",
                kind="rate_limit_error",
            )
        svc.pending += 1
        streaming = False  # once the stream runs, it frees the slot when generation ends

        def release():
            svc.pending -= 1

        try:
            try:  # image decoding off the event loop; what cannot be decoded is 422
                messages = await run_in_threadpool(request_messages, req, engine, svc.allow_files)
            except ExportError as e:
                raise _from_export_error(e, 422) from None
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                stream = _stream(svc, messages, settings, deadline, cid, req.return_reasoning, include_usage, release)
                streaming = True
                return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            cancel = threading.Event()
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(svc.worker, _job(svc, messages, settings, deadline, cancel, None))
            while True:
                done, _ = await asyncio.wait({job}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    cancel.set()
            try:
                result = job.result()
            except _Cancelled:
                return Response(status_code=204)  # nobody is listening
            return _completion(svc, cid, result, req.return_reasoning)
        except ExportError as e:
            raise _from_export_error(e) from None
        finally:
            if not streaming:
                release()

    return app


def _document_request_body(app) -> None:
    """/docs shows the request schema although the endpoint parses the body itself (to answer size,
    JSON and schema errors in OpenAI's format rather than FastAPI's)."""
    from fastapi.openapi.utils import get_openapi

    schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update({**defs, "ChatRequest": schema})
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


async def _read_request(request, limit: int) -> ChatRequest:
    from pydantic import ValidationError

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            400,
            f"Content-Type must be application/json; got {excerpt(kind or 'none', 60)}",
            code="invalid_content_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}", code="body_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({excerpt(str(e), 80)})", code="invalid_json") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {excerpt(param, 60)}"
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise ApiError(
            400, f"{excerpt(param or 'body', 80)}: {excerpt(msg, 200)}{more}", param=param, code="invalid_request"
        ) from None


def _job(svc: Service, messages, settings, deadline, cancel: threading.Event, on_text):
    def run() -> ChatResult:
        if cancel.is_set():  # the client left while the request waited in the queue
            raise _Cancelled
        return svc.engine.chat(
            messages,
            max_tokens=settings["max_tokens"],
            sampling=settings["sampling"],
            stop=settings["stop"],
            enable_thinking=settings["enable_thinking"],
            on_text=on_text,
            cancelled=cancel.is_set,
            deadline=deadline,
        )

    return run


class _Cancelled(Exception):
    pass


def _usage(r: ChatResult) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": len(r.tokens),
        "total_tokens": r.prompt_tokens + len(r.tokens),
        "prompt_tokens_details": {"cached_tokens": r.reused_tokens},
    }


def _completion(svc: Service, cid: str, r: ChatResult, return_reasoning: bool) -> dict:
    message = {"role": "assistant", "content": r.text}
    if return_reasoning:
        reasoning, answer = split_reasoning(r.text)
        message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": svc.model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason}],
        "usage": _usage(r),
    }


async def _stream(svc: Service, messages, settings, deadline, cid, return_reasoning, include_usage, release):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    created = int(time.time())

    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": svc.model_name,
            "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def on_text(delta: str) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("text", delta))

    job = loop.run_in_executor(svc.worker, _job(svc, messages, settings, deadline, cancel, on_text))
    job.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))
    text, sent_reasoning, sent_answer = "", "", ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "done":
                break
            text += value
            if not return_reasoning:
                yield chunk({"content": value})
                continue
            reasoning, answer = split_reasoning(text, final=False)
            delta = {}
            if len(reasoning) > len(sent_reasoning):
                delta["reasoning_content"], sent_reasoning = reasoning[len(sent_reasoning) :], reasoning
            if len(answer) > len(sent_answer):
                delta["content"], sent_answer = answer[len(sent_answer) :], answer
            if delta:
                yield chunk(delta)
        try:
            result = job.result()
        except _Cancelled:
            return
        except ExportError as e:
            yield f"data: {json.dumps(_from_export_error(e).body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if return_reasoning:  # what the streaming split held back (a half tag at the very end)
            reasoning, answer = split_reasoning(result.text)
            delta = {}
            if len(reasoning) > len(sent_reasoning):
                delta["reasoning_content"] = reasoning[len(sent_reasoning) :]
            if len(answer) > len(sent_answer):
                delta["content"] = answer[len(sent_answer) :]
            if delta:
                yield chunk(delta)
        yield chunk({}, finish=result.finish_reason)
        if include_usage:
            yield chunk({}, usage=_usage(result))
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away (or the stream ended): generation stops at its next token
        if not job.done():
            try:
                await asyncio.shield(job)  # the slot frees when the model is free again, not before
            except BaseException:
                pass
        release()


def serve(
    bundle: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "autoglm-phone-9b",
    allow_files: str | Path | None = None,
    max_queue: int = 8,
    allow_failed: bool = False,
    say=print,
    warn=print,
) -> None:
    """Load the bundle and serve it until interrupted."""
    import uvicorn

    root = None
    if allow_files is not None:
        root = Path(allow_files)
        if not root.is_dir():
            raise ExportError("not a directory", file=root, field="--allow-files", fix="pass an existing directory")
    t0 = time.perf_counter()
    engine = ChatEngine(bundle, allow_failed=allow_failed, warn=warn)
    opened = time.perf_counter() - t0
    warm = engine.warm_up()
    app = create_app(engine, model_name=model_name, allow_files=root, max_queue=max_queue)
    say(
        f"serving {engine.bundle} ({engine.manifest['target']}, max_context {engine.max_context}) as {model_name!r} "
        f"on http://{host}:{port}/v1 (OpenAPI docs: /docs); opened in {opened:.1f} s, text path loaded in {warm:.1f} s"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
