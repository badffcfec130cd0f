"""`autoglm-export serve` (issue #30) with the real clients its users run: the official `openai`
package and langchain-openai's `ChatOpenAI`, against the CLI started on a free loopback port on the
tiny xnnpack bundle. The replay and the equality checks compare with the library (`ChatEngine`)
fed the same requests in the same order, so both hold the same cache and reuse the same prefix."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from autoglm_export.host.prompt import IMAGE
from conftest import REPO

MODEL = "autoglm-phone-9b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(w: int, h: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    (d / "screen.png").write_bytes(_png(90, 200, 7))
    return d


@pytest.fixture(scope="module")
def server(xnnpack_bundle, allowed, tmp_path_factory):
    bundle, _ = xnnpack_bundle
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autoglm_export.cli",
                "serve",
                str(bundle),
                "--port",
                str(port),
                "--allow-files",
                str(allowed),
                "--max-queue",
                "4",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "server did not come up: " + log.read_text()[-3000:]
        time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine(xnnpack_bundle):
    from autoglm_export.chat_engine import ChatEngine

    return ChatEngine(xnnpack_bundle[0])


def _library_messages(engine, messages):
    """The OpenAI-format messages as the library's, through the server's own conversion."""
    from autoglm_export.serve.app import request_messages
    from autoglm_export.serve.schema import ChatRequest

    return request_messages(
        ChatRequest.model_validate({"model": "autoglm-phone-9b", "messages": messages}), engine, None
    )


def test_agent_replay_equals_the_library_turn_by_turn_and_prefills_only_the_new_turn(server, engine):
    """A 5-step phone-agent loop as Open-AutoGLM runs it: a system prompt, one user turn per screen
    with a portrait screenshot, earlier screenshots dropped from the history, the model's answers
    sent back as assistant turns, temperature 0 with frequency_penalty 0.2, streamed. Runs first in
    this module, so the server's cache starts as empty as the library's."""
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="EMPTY")
    history = [{"role": "system", "content": "Agent."}]
    dropped_at = None  # where the previous turn's screenshot began (dropped from the next turn)
    for step in range(5):
        shot = _data_url(_png(90, 200, step))
        for m in history:  # earlier screens are dropped, their text kept
            if m["role"] == "user" and isinstance(m["content"], list):
                m["content"] = [p for p in m["content"] if p["type"] == "text"]
        history.append(
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": shot}}, {"type": "text", "text": f"s{step}"}],
            }
        )
        stream = client.chat.completions.create(
            model=MODEL,
            messages=history,
            temperature=0,
            top_p=0.85,
            frequency_penalty=0.2,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
        from autoglm_export.host.sampling import SamplingParams

        ours = engine.chat(
            _library_messages(engine, history),
            max_tokens=3,
            sampling=SamplingParams(temperature=0, top_p=0.85, frequency_penalty=0.2),
        )
        assert text == ours.text and finish == ours.finish_reason, step
        assert usage.prompt_tokens == ours.prompt_tokens and usage.completion_tokens == len(ours.tokens)
        assert usage.prompt_tokens_details.cached_tokens == ours.reused_tokens
        if step:
            # everything before the change is reused: the cache runs up to where the previous turn's
            # screenshot was (dropped now), and only that turn's text, the answer and the new turn run
            assert ours.reused_tokens == dropped_at and ours.reused_tokens >= 12, (ours.reused_tokens, dropped_at)
        rendered = engine.render(_library_messages(engine, history))
        assert (
            rendered.prompt.types.count(IMAGE) == 32
        )  # the 90 x 200 screen in the 224 x 112 portrait bucket: 8 x 4 tokens
        dropped_at = rendered.prompt.ids.index(engine.tokenizer.special["begin_of_image"])
        history.append({"role": "assistant", "content": text})


def test_each_image_goes_to_the_bucket_closest_in_aspect_ratio(engine):
    """Issue #30 item 2: a portrait screenshot runs the portrait bucket's vision method with its own
    grid, a near-square photo the square one; the prompt carries each bucket's token count."""
    from autoglm_export.host.messages import Message, Part

    calls = []
    inner = engine.runtime.vision_encoder

    def spy(x, method="vision_encoder"):
        calls.append((method, tuple(x.shape)))
        return inner(x, method)

    engine.runtime.vision_encoder = spy
    try:
        for (w, h), tokens in (((90, 200), 32), ((120, 110), 16)):
            img = Image.open(io.BytesIO(_png(w, h, 3))).convert("RGB")
            messages = [Message("user", (engine.image_part(img), Part.of_text("read the screen")))]
            assert engine.render(messages).prompt.types.count(IMAGE) == tokens
            assert engine.chat(messages, max_tokens=2).finish_reason in ("length", "stop")
    finally:
        del engine.runtime.vision_encoder  # the instance attribute: the method is the class's again
    assert calls == [("vision_encoder_224x112", (128, 588)), ("vision_encoder", (64, 588))]


def test_openai_client_stream_and_non_stream_are_identical(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="EMPTY")
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Open settings"},
                {"type": "image_url", "image_url": {"url": _data_url(_png(90, 200, 1))}},
            ],
        }
    ]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
        if c.choices
    ]
    assert whole.choices[0].message.content == "".join(parts)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    # sampling with a seed is reproducible; different seeds may differ
    a, b = (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, top_p=0.9, seed=5)
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b


def test_langchain_chat_openai_as_autoglm_users_call_it(server, allowed):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=server + "/v1",
        api_key="EMPTY",
        streaming=True,
        max_tokens=8,
        extra_body={"enable_thinking": True, "return_reasoning": True},
    )
    msgs = [
        SystemMessage(content="Agent."),
        HumanMessage(
            content=[
                {"type": "text", "text": "Tap home"},
                {"type": "image_url", "image_url": {"url": (allowed / "screen.png").as_uri()}},
            ]
        ),
    ]
    streamed = "".join(c.content for c in llm.stream(msgs))
    whole = llm.invoke(msgs)
    assert streamed == whole.content
    assert whole.response_metadata.get("finish_reason") in ("stop", "length")


def test_reasoning_is_returned_apart_when_asked():
    from autoglm_export.host.conversation import split_reasoning

    assert split_reasoning('<think>look at the screen</think><answer>do(action="Tap")</answer>') == (
        "look at the screen",
        '<answer>do(action="Tap")</answer>',
    )
    assert split_reasoning("no think block") == ("", "no think block")
    # streaming: a tag still being written is held back, never shown as answer text
    assert split_reasoning("<thi", final=False) == ("", "")
    assert split_reasoning("<think>abc</thi", final=False) == ("abc", "")
    assert split_reasoning("<think>abc</think>x", final=False) == ("abc", "x")


def test_bounded_load_four_clients_ten_requests_each_nothing_lost(server):
    results, errors = [], []

    def client(k: int) -> None:
        with httpx.Client(base_url=server, timeout=120) as c:
            for i in range(10):
                r = c.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": f"c{k} r{i}"}]},
                )
                (results if r.status_code == 200 else errors).append((k, i, r.status_code, r.text[:200]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 40
    assert httpx.get(server + "/health").json()["queued"] == 0


def test_a_full_queue_answers_429_and_admitted_requests_all_complete(server):
    codes = []

    def one(i: int) -> None:
        r = httpx.post(
            server + "/v1/chat/completions",
            timeout=120,
            json={"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": f"q{i}"}]},
        )
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes)) == [200, 429] and codes.count(200) >= 4, codes


def _post(server, body=None, *, raw: bytes | None = None, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(
        server + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body), headers=h, timeout=120
    )


def _user(content):
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    "case, status, needle",
    [
        ("malformed", 400, "not valid JSON"),
        ("content_type", 400, "Content-Type"),
        ("unknown_field", 400, "Unrecognized request argument supplied: max_token"),
        ("bad_part_type", 400, "messages"),
        ("n2", 400, "less than or equal to 1"),
        ("model", 404, "not served here"),
        ("http_url", 400, "nothing is fetched"),
        ("file_outside", 400, "outside the allowed directory"),
        ("bad_base64", 400, "invalid base64"),
        ("not_an_image", 422, "cannot read image"),
        ("huge_pixels", 422, "image too large"),
        ("huge_image", 413, "too large"),
        ("huge_body", 413, "over the limit"),
        ("context", 400, "does not fit the bundle's context"),
        ("quality_header", 400, "X-Output-Quality"),
        ("budget_header", 400, "X-Compute-Budget-MS"),
        ("memory_limit", 422, "needs"),
        ("audio_without_tower", 422, "no audio encoder"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, case, status, needle, tmp_path):
    ok = {"type": "text", "text": "hi"}
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(8, 8, 0))

    def huge_png() -> bytes:  # encoding 64 M pixels takes ~0.6 s: only for the case that sends it
        buf = io.BytesIO()
        Image.new("RGB", (8000, 8000)).save(buf, format="PNG")
        return buf.getvalue()

    bodies = {
        "unknown_field": {**_user("hi"), "max_token": 5},
        "bad_part_type": _user([{"type": "video_url", "video_url": {"url": "x"}}]),
        "n2": {**_user("hi"), "n": 2},
        "model": {**_user("hi"), "model": "gpt-4o"},
        "http_url": _user([ok, {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]),
        "file_outside": _user([{"type": "image_url", "image_url": {"url": outside.as_uri()}}]),
        "bad_base64": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]),
        "not_an_image": _user(
            [
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()},
                }
            ]
        ),
        "huge_pixels": lambda: _user([{"type": "image_url", "image_url": {"url": _data_url(huge_png())}}]),
        "huge_image": _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (28 << 20)}}]),
        "context": _user("word " * 300),
        "audio_without_tower": _user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]),
    }
    headers = {
        "quality_header": {"X-Output-Quality": "ultra"},
        "budget_header": {"X-Compute-Budget-MS": "soon"},
        "memory_limit": {"X-Memory-Limit-MB": "1"},
    }
    if case == "malformed":
        r = _post(server, raw=b'{"model": "autoglm-phone-9b", "messages": [')
    elif case == "content_type":
        r = _post(server, raw=b"{}", headers={"content-type": "text/plain"})
    elif case == "huge_body":
        r = _post(server, raw=b" " * (65 << 20))
    else:
        body = bodies.get(case, _user("hi"))
        r = _post(server, body() if callable(body) else body, headers=headers.get(case))
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and len(err["message"]) < 1000


def test_refused_streaming_requests_give_their_queue_slot_back(server):
    """A streamed request refused before its stream starts (here: an undecodable image) must free
    its admission slot: more of them than --max-queue, then a normal request is still admitted."""
    bad = {
        **_user(
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]
        ),
        "stream": True,
    }
    for _ in range(6):
        assert _post(server, bad).status_code == 422
    assert httpx.get(server + "/health").json()["queued"] == 0
    assert _post(server, _user("hi")).status_code == 200


def test_compute_budget_stops_generation_and_says_so(server):
    r = _post(server, {**_user("hi"), "max_tokens": 100}, headers={"X-Compute-Budget-MS": "1"})
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "compute_budget"
    assert body["usage"]["completion_tokens"] < 100


def test_output_quality_presets_and_openapi_docs(server):
    fast = _post(server, _user("hi"), headers={"X-Output-Quality": "speed"})
    assert fast.status_code == 200
    assert httpx.get(server + "/docs").status_code == 200
    doc = httpx.get(server + "/openapi.json").json()
    assert "ChatRequest" in doc["components"]["schemas"] and "/v1/chat/completions" in doc["paths"]


def test_library_prefix_reuse_sampling_stops_and_cancel(engine):
    """The conversation runtime itself: a reused prefix gives the tokens a fresh cache gives; a seed
    makes sampling reproducible; a stop string ends the answer before it; cancel stops it."""
    from autoglm_export.chat_engine import ChatEngine
    from autoglm_export.host.messages import Message
    from autoglm_export.host.sampling import SamplingParams

    first = [Message.text("system", "Agent."), Message.text("user", "go")]
    r1 = engine.chat(first, max_tokens=4)
    second = first + [Message.text("assistant", r1.text), Message.text("user", "next")]
    reused = engine.chat(second, max_tokens=6)
    fresh = ChatEngine(engine.bundle).chat(second, max_tokens=6)
    assert reused.reused_tokens > 10 and fresh.reused_tokens == 0
    assert reused.tokens == fresh.tokens
    s = SamplingParams(temperature=1.2, top_k=50, top_p=0.9, seed=11, presence_penalty=0.5)
    assert engine.chat(second, max_tokens=8, sampling=s).tokens == engine.chat(second, max_tokens=8, sampling=s).tokens
    whole = engine.chat(second, max_tokens=10).text
    if len(whole) > 3:
        cut = engine.chat(second, max_tokens=10, stop=[whole[2:4]])
        assert cut.finish_reason == "stop" and cut.text == whole[: whole.find(whole[2:4])]
    stopped = engine.chat(second, max_tokens=10, cancelled=lambda: True)
    assert stopped.finish_reason == "cancelled" and len(stopped.tokens) == 1


def test_warm_up_loads_the_text_path_and_changes_no_answer(engine, xnnpack_bundle):
    """`serve` runs the text path once before it listens, so the first request does not wait for
    the methods to load (XNNPACK packs their weights then); the answers stay the same."""
    from autoglm_export.chat_engine import ChatEngine
    from autoglm_export.host.messages import Message

    msgs = [Message.text("system", "Agent."), Message.text("user", "warm up")]
    want = engine.chat(msgs, max_tokens=6)
    warm = ChatEngine(xnnpack_bundle[0])
    assert "text_decoder" not in warm.runtime._methods
    assert warm.warm_up() > 0
    assert {"token_embedding", "text_decoder"} <= set(warm.runtime._methods)
    got = warm.chat(msgs, max_tokens=6)
    assert got.tokens == want.tokens and got.reused_tokens == 0
