"""`serve` against the library on the same bundle (issue #30; not in CI).

    python bench/serve.py BUNDLE [--turns 10] [--tokens 64] [--reps 3] [--out bench/results/serve-NAME.json] [--allow-failed]

1. Server overhead per token: the same request (a short user turn, greedy, --tokens new tokens)
   through the library (`ChatEngine.chat`, in this process) and through `autoglm-export serve`
   (a subprocess, with the `openai` client), alternating library, server, library ...; median of
   --reps. Overhead per token = (server request time - library request time) / tokens, as a
   fraction of the library's own decode time per token.
2. Prefix reuse on a --turns phone-agent conversation (system prompt, one user turn per screen with
   a 9:20 screenshot, earlier screenshots dropped, the answers sent back): per turn the prompt
   tokens, the tokens the server took from its cache (`usage.prompt_tokens_details.cached_tokens`)
   and its time to the first token, against the library with its cache forgotten before each turn
   (everything prefilled), alternating.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _png(w: int, h: int, seed: int) -> str:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _library_messages(engine, messages):
    """The OpenAI-format messages as the library's, through the server's own conversion."""
    from autoglm_export.serve.app import request_messages
    from autoglm_export.serve.schema import ChatRequest

    return request_messages(
        ChatRequest.model_validate({"model": "autoglm-phone-9b", "messages": messages}), engine, None
    )


def start_server(bundle: Path, allow_failed: bool) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "autoglm_export.cli", "serve", str(bundle), "--port", str(port)]
        + (["--allow-failed"] if allow_failed else []),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server exited")
        time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--allow-failed", action="store_true", help="a bundle whose parity gates failed (random 9B-shape weights)"
    )
    args = ap.parse_args()

    from openai import OpenAI

    from autoglm_export.chat_engine import ChatEngine
    from autoglm_export.host.messages import Message

    engine = ChatEngine(args.bundle, allow_failed=args.allow_failed)
    proc, base = start_server(args.bundle, args.allow_failed)
    client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
    try:
        # 1. per-token overhead, alternating; whole requests (not stream chunks: the random 9B-shape
        # model mostly emits reserved tokens that decode to no text, so chunks do not count tokens)
        text = "Open the settings app and find the battery page."
        lib, srv, lib_tok = [], [], []
        for r in range(args.reps):
            words = f"{r} {text}"  # a new prompt each rep on both sides: the same prefill work
            t0 = time.perf_counter()
            res = engine.chat([Message.text("user", words)], max_tokens=args.tokens)
            lib.append(time.perf_counter() - t0)
            lib_tok.append(res.decode_s / max(len(res.tokens) - 1, 1))
            t0 = time.perf_counter()
            out = client.chat.completions.create(
                model="autoglm-phone-9b", max_tokens=args.tokens, messages=[{"role": "user", "content": words}]
            )
            srv.append(time.perf_counter() - t0)
            assert out.usage.completion_tokens == len(res.tokens), (out.usage, len(res.tokens))
            print(
                f"rep {r}: library {lib[-1]:.3f} s, server {srv[-1]:.3f} s for {len(res.tokens)} tokens "
                f"(library decode {lib_tok[-1] * 1e3:.2f} ms/token)",
                flush=True,
            )
        n = len(res.tokens)
        extra_per_token = (statistics.median(srv) - statistics.median(lib)) / n
        overhead = extra_per_token / statistics.median(lib_tok)

        # 2. prefix reuse on an agent conversation, alternating server (reusing) and library (fresh)
        history = [
            {"role": "system", "content": "You are a phone agent. Answer with do(action=...) or finish(message=...)."}
        ]
        turns = []
        for t in range(args.turns):
            for m in history:
                if m["role"] == "user" and isinstance(m["content"], list):
                    m["content"] = [p for p in m["content"] if p["type"] == "text"]
            history.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Step {t}: the screen is attached."},
                        {"type": "image_url", "image_url": {"url": _png(90, 200, t)}},
                    ],
                }
            )
            t0 = time.perf_counter()
            first = None
            answer, usage = "", None
            for chunk in client.chat.completions.create(
                model="autoglm-phone-9b",
                messages=history,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            ):
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    answer += chunk.choices[0].delta.content
            ttft = (first or time.perf_counter()) - t0
            engine._cached = []  # forget the cache: the library prefills everything
            fresh = engine.chat(_library_messages(engine, history), max_tokens=8)
            turns.append(
                {
                    "turn": t,
                    "prompt_tokens": usage.prompt_tokens,
                    "cached_tokens": usage.prompt_tokens_details.cached_tokens,
                    "server_ttft_s": round(ttft, 4),
                    "fresh_prefill_s": round(fresh.prefill_s, 4),
                    "same_answer": fresh.text == answer,
                }
            )
            print(turns[-1], flush=True)
            history.append({"role": "assistant", "content": answer})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "bundle": str(args.bundle),
        "target": engine.manifest["target"],
        "max_context": engine.max_context,
        "tokens": n,
        "library_request_s": [round(x, 4) for x in lib],
        "server_request_s": [round(x, 4) for x in srv],
        "library_decode_ms_per_token": [round(x * 1e3, 3) for x in lib_tok],
        "server_extra_ms_per_token": round(extra_per_token * 1e3, 4),
        "server_overhead_per_token": round(overhead, 4),
        "agent_turns": turns,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "agent_turns"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
