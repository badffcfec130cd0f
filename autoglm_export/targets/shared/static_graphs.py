"""Static-shape graphs of each component for NPU targets (onnx-qnn, qnn), with calibration data.

One graph per encoder; the token embedding and the text decoder as a prefill graph of
``prefill_chunk`` tokens and a decode graph of one token; the decoder in the host-cache form
(``TextDecoderStatic``). Calibration: the recipe's screenshots and prompts (``calibration.py``;
each prompt a chat turn with its screenshot's encoding spliced in at M-RoPE positions, as ``run``
builds it) plus fixed, seeded inputs unlike the verification ones: a rotated test card for the
vision encoder, a reversed chirp for the audio encoder, random tokens with that card's encoding
spliced in for the decoder, and seeded noise. Decoder sequences run in fp32 through prefill
chunks and decode steps, so every graph sees the cache states it will see.

``state`` carries what one component's calibration needs from another (the recipe's
``CalibrationSet`` under "calibration", token embeddings, image encodings) across components
exported in registry order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...methods import VISION_METHOD, is_vision_method
from ...models import family_of

CALIBRATION_SEED = 1234


@dataclass
class StaticGraph:
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    calibration: list[dict]  # input name -> numpy array, one dict per calibration sample
    tokens: int | None = None  # the static token count of prefill / decode graphs


def graph_names(component: str) -> list[str]:
    if component in ("token_embedding", "text_decoder"):
        return [f"{component}_prefill", f"{component}_decode"]
    return [component]


@torch.no_grad()
def static_graphs(name: str, module: torch.nn.Module, prefill_chunk: int, state: dict) -> dict[str, StaticGraph]:
    family = family_of(module)
    module = module.float().eval()
    family.set_norm_mode(module, "plain")  # one fusable rms_norm pattern (onnx_qnn/rms_norm_fusion.py)
    out: dict[str, StaticGraph] = {}
    if is_vision_method(name) or name == "audio_encoder":
        (x,) = module.example_inputs()
        key = "pixel_values" if is_vision_method(name) else "input_features"
        res = "image_embeddings" if is_vision_method(name) else "audio_embeddings"
        out[name] = StaticGraph(module, (x,), [key], [res], _encoder_calibration(name, module, x, state))
    elif name == "token_embedding":
        g = torch.Generator().manual_seed(CALIBRATION_SEED)
        vocab = module.embed_tokens.num_embeddings
        for graph, T in zip(graph_names(name), (prefill_chunk, 1)):
            ids = torch.randint(0, vocab, (1, T), generator=g)
            calib = [{"input_ids": torch.randint(0, vocab, (1, T), generator=g).numpy()} for _ in range(4)]
            calib.append({"input_ids": torch.arange(vocab - T, vocab).view(1, T).numpy()})  # the special tokens
            for p in _calibration_set(state).prompts:  # the recipe's prompts, cut as the runtime cuts them
                ids_p = np.asarray(p.ids, np.int64)[None]
                calib += [{"input_ids": ids_p[:, a : a + T]} for a in range(0, ids_p.shape[1] - T + 1, T)][:4]
            out[graph] = StaticGraph(module, (ids,), ["input_ids"], ["embeddings"], calib, T)
        state["embeds"] = module(torch.randint(0, vocab, (1, 4 * prefill_chunk + 6), generator=g))
        state["prompt_embeds"] = [module(torch.tensor([p.ids])) for p in _calibration_set(state).prompts]
    elif name == "text_decoder":
        wrapper = family.decoder_form("host_cache", module).eval()
        names = ["inputs_embeds", "cos", "sin", "mask", *wrapper.cache_names()]
        outs = wrapper.output_names()
        feeds = _decoder_calibration(wrapper, prefill_chunk, state)
        for graph, T in zip(graph_names(name), (prefill_chunk, 1)):
            calib = [f for f in feeds if f["inputs_embeds"].shape[1] == T]
            args = tuple(torch.from_numpy(calib[0][n]) for n in names)
            out[graph] = StaticGraph(wrapper, args, names, outs, calib, T)
        state["rope"] = wrapper.rope()
    else:
        raise KeyError(name)
    return out


def _encoder_calibration(name: str, module, example: torch.Tensor, state: dict) -> list[dict]:
    from ...host.golden import golden_audio, golden_image
    from ...host.image import patchify

    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    key = "pixel_values" if is_vision_method(name) else "input_features"
    if is_vision_method(name):
        h, w = module.image_size
        img = np.asarray(golden_image(h, w).rotate(90, expand=True), np.float32).transpose(2, 0, 1) / 255.0
        img = (img - 0.45) / 0.27
        real = torch.from_numpy(patchify(img.astype(np.float32), module.v.patch_size, module.v.spatial_merge_size))
    else:
        from ...host.audio import AudioPreprocessing, log_mel

        pre = AudioPreprocessing(frames=example.shape[-1], mel_bins=example.shape[1])
        real = torch.from_numpy(log_mel(golden_audio(1.5)[::-1].copy(), pre)[None])
    samples = [real, torch.randn(example.shape, generator=g), 0.5 * torch.randn(example.shape, generator=g)]
    if name == VISION_METHOD:  # the decoder's calibration prompts carry the first bucket's image tokens
        state["image"] = module(real)
        shots = [torch.from_numpy(pv) for pv in _calibration_set(state).pixel_values]
        state["screenshots"] = [module(pv) for pv in shots]
        samples = shots + samples
    elif is_vision_method(name):  # another bucket: the same screenshots at its size
        samples = [torch.from_numpy(pv) for pv in _calibration_set(state).pixels_at(module.image_size)] + samples
    return [{key: s.numpy().astype(np.float32)} for s in samples]


def _calibration_set(state: dict):
    from ...calibration import CalibrationSet

    return state.get("calibration") or CalibrationSet()


def _decoder_calibration(wrapper, chunk: int, state: dict) -> list[dict]:
    """Feeds of every recorded call of the decoder (or of one part of it). A part after the first
    is calibrated on what the part before it computed in fp32 for the same sequences
    (``state["decoder_sequences"]``), so chained parts see the activations the whole decoder sees."""
    sequences = (
        _decoder_sequences(wrapper, chunk, state)
        if wrapper.decoder.layer_ids[0] == 0
        else state.pop("decoder_sequences")
    )
    feeds: list[dict] = []
    hidden = []
    for x, pos in sequences:
        got, out = _run_sequence(wrapper, x, pos, chunk)
        feeds += got
        hidden.append((out, pos))
    if not wrapper.decoder.has_head:
        state["decoder_sequences"] = hidden
    return feeds


def _decoder_sequences(wrapper, chunk: int, state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs_embeds [1, L, D], position_ids [3, L]) of each calibration sequence."""
    from ...host.prompt import IMAGE

    d = wrapper.decoder
    t = d.t
    embeds = state.get("embeds")
    if embeds is None:  # the token embedding is exported first; this keeps a lone decoder usable
        embeds = torch.randn(1, 4 * chunk + 6, t.hidden_size, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    embeds = embeds.clone()
    image = state.get("image")
    if image is not None:
        n = min(image.shape[0], embeds.shape[1] - 4)
        embeds[0, 3 : 3 + n] = image[:n]
    L = embeds.shape[1]
    sequences = [(embeds, torch.arange(L).unsqueeze(0).expand(3, L).contiguous())]
    cal = _calibration_set(state)
    shots = state.get("screenshots") or []
    for k, (p, pos) in enumerate(zip(cal.prompts, cal.positions)):
        x = state["prompt_embeds"][k].clone()
        if shots:
            x[0, torch.tensor(p.types) == IMAGE] = shots[k % len(shots)].to(x.dtype)
        # then a few decode steps on random tokens' embeddings, positions carrying on after the prompt
        steps = min(4, d.max_context - x.shape[1])
        x = torch.cat([x, embeds[:, :steps]], dim=1)
        after = torch.arange(int(pos.max()) + 1, int(pos.max()) + 1 + steps).expand(3, steps)
        sequences.append((x, torch.cat([torch.from_numpy(pos), after], dim=1)))
    return sequences


DECODE_SAMPLES = 6  # decode calls recorded per sequence: each holds a copy of every layer's cache


def _run_sequence(wrapper, embeds, positions, chunk: int) -> tuple[list[dict], torch.Tensor | None]:
    """fp32 prefill chunks, then decode steps for the rest; the inputs of every prefill call and
    of ``DECODE_SAMPLES`` evenly spaced decode calls are recorded. Also returns, for a part before
    the last, its hidden states over the whole sequence (the next part's inputs)."""
    d = wrapper.decoder
    t = d.t
    caches = [torch.zeros(1, t.num_kv_heads, d.max_context, t.head_dim) for _ in range(2 * len(d.layer_ids))]
    hidden = None if d.has_head else torch.zeros_like(embeds)
    L = embeds.shape[1]
    calls = [(a, a + chunk) for a in range(0, L - chunk + 1, chunk)]
    first_decode = calls[-1][1] if calls else 0
    calls += [(a, a + 1) for a in range(first_decode, L)]
    decodes = L - first_decode
    keep = {
        first_decode + round(i * (decodes - 1) / max(1, DECODE_SAMPLES - 1))
        for i in range(min(DECODE_SAMPLES, decodes))
    }
    feeds = []
    for a, b in calls:
        cos, sin, mask = wrapper.host_inputs(positions[:, a:b].contiguous(), torch.arange(a, b))
        if b - a == chunk or a in keep:
            feed = {
                "inputs_embeds": embeds[:, a:b].numpy().copy(),
                "cos": cos.numpy(),
                "sin": sin.numpy(),
                "mask": mask.numpy(),
            }
            feed |= {n: c.numpy().copy() for n, c in zip(wrapper.cache_names(), caches)}
            feeds.append(feed)
        out = wrapper(embeds[:, a:b], cos, sin, mask, *caches)
        for i, new in enumerate(out[1:]):
            caches[i][:, :, a:b] = new
        if hidden is not None:
            hidden[:, a:b] = out[0]
    return feeds, hidden


def decoder_graph_keys(component: dict) -> list[dict[str, str]]:
    """The decoder's programs in layer order, each {"prefill": key, "decode": key}: the graph names
    for a decoder in one program; ``"<file>:<graph>"`` for each part of a decoder lowered in parts
    (every part file has the same two methods)."""
    files = [p["file"] for p in component.get("programs") or []] or [None]
    return [{kind: graph_key(f, f"text_decoder_{kind}") for kind in ("prefill", "decode")} for f in files]


def graph_key(part_file: str | None, graph: str) -> str:
    """A graph's key in a runtime: its name, or ``"<file>:<graph>"`` in a decoder part's file."""
    return f"{part_file}:{graph}" if part_file else graph


def graph_entries(manifest: dict) -> dict[str, tuple[str, str, dict]]:
    """Every static graph of a bundle: key (``decoder_graph_keys``) -> (file, method, manifest entry)."""
    out = {}
    for comp in manifest["components"].values():
        for p in comp.get("programs") or [comp]:
            for graph, g in p.get("graphs", {}).items():
                out[graph_key(p["file"] if comp.get("programs") else None, graph)] = (p.get("file"), graph, g)
    return out


class StaticGraphRuntime:
    """Host side of a bundle of static graphs, shared by the NPU targets: a call of exactly
    ``prefill_chunk`` tokens runs the prefill graph, any other length runs the decode graph token
    by token; the host holds the KV cache and computes cos/sin and the mask. A decoder lowered in
    parts runs its programs in layer order, the hidden states of each feeding the next, each with
    its own layers' caches. Subclasses run one graph (``_run``: graph key, input name -> array,
    returns the outputs in order)."""

    def __init__(self, manifest: dict, graph_inputs: dict[str, list[tuple[str, list[int]]]]) -> None:
        self.manifest = manifest
        self.max_context = manifest["shapes"]["max_context"]
        self.prefill_chunk = manifest["shapes"]["prefill_chunk"]
        self.graph_inputs = graph_inputs
        dec = manifest["components"].get("text_decoder")
        self.rope = dec["rope"] if dec else None
        keys = decoder_graph_keys(dec) if dec else []
        self.decoder_keys = [k for k in keys if k["decode"] in graph_inputs]  # none: a runtime of other components
        self.reset()

    def _run(self, graph: str, feeds: dict) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        self.caches = [
            [np.zeros(shape, np.float32) for _, shape in self.graph_inputs[k["decode"]][4:]] for k in self.decoder_keys
        ]

    def token_embedding(self, input_ids):
        ids = input_ids.numpy()
        T = ids.shape[1]
        if T == self.prefill_chunk:
            return torch.from_numpy(np.asarray(self._run("token_embedding_prefill", {"input_ids": ids})[0]))
        parts = [np.asarray(self._run("token_embedding_decode", {"input_ids": ids[:, i : i + 1]})[0]) for i in range(T)]
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def vision_encoder(self, pixel_values, method: str = "vision_encoder"):
        return torch.from_numpy(
            np.asarray(self._run(method, {"pixel_values": pixel_values.numpy().astype(np.float32)})[0])
        )

    def audio_encoder(self, input_features):
        x = input_features.numpy().astype(np.float32)
        return torch.from_numpy(np.asarray(self._run("audio_encoder", {"input_features": x})[0]))

    def text_decoder(self, embeds, position_ids, cache_position):
        x, pos, slots = embeds.numpy().astype(np.float32), position_ids.numpy(), cache_position.numpy()
        T = x.shape[1]
        if T == self.prefill_chunk:
            return torch.from_numpy(self._decoder_call("prefill", x, pos, slots))
        logits = None
        for i in range(T):  # static shapes: a shorter chunk goes token by token
            logits = self._decoder_call("decode", x[:, i : i + 1], pos[:, i : i + 1], slots[i : i + 1])
        return torch.from_numpy(logits)

    def _decoder_call(self, kind: str, x, pos, slots) -> np.ndarray:
        from ...host.static_decoder import attention_mask, rotary_cos_sin

        T = x.shape[1]
        start = int(slots[0])
        cos, sin = rotary_cos_sin(self.rope, pos)
        mask = attention_mask(start, T, self.max_context)
        for keys, caches in zip(self.decoder_keys, self.caches):  # hidden states flow from each part to the next
            graph = keys[kind]
            feeds = {"inputs_embeds": x, "cos": cos, "sin": sin, "mask": mask}
            feeds |= {name: c for (name, _), c in zip(self.graph_inputs[graph][4:], caches)}
            x, *new = [np.asarray(o) for o in self._run(graph, feeds)]
            for cache, kv in zip(caches, new):
                cache[:, :, start : start + T] = kv
        return x

    def probe_feeds(self, graph: str) -> dict:
        """Seeded inputs of the right shapes and ranges for a graph (reload comparisons)."""
        from ...host.static_decoder import attention_mask, rotary_cos_sin

        g = np.random.default_rng(7)
        feeds = {}
        for name, shape in self.graph_inputs[graph]:
            if name == "input_ids":
                feeds[name] = g.integers(0, self.manifest["model"]["text"]["vocab_size"], shape).astype(np.int64)
            elif name in ("cos", "sin"):
                feeds["cos"], feeds["sin"] = rotary_cos_sin(self.rope, np.tile(np.arange(5, 5 + shape[2]), (3, 1)))
            elif name == "mask":
                feeds[name] = attention_mask(5, shape[2], self.max_context)
            else:
                feeds[name] = g.standard_normal(shape).astype(np.float32)
        return feeds

    def close(self) -> None:
        """Nothing to end: the graphs run in this process (the qnn emulator's runtime overrides this)."""


class ComponentAdapter:
    """One component of a ``StaticGraphRuntime`` called like the PyTorch module it stands for
    (the "same quantization" reference of the NPU targets in ``verify``)."""

    def __init__(self, runtime: StaticGraphRuntime, name: str) -> None:
        self.runtime, self.name = runtime, name

    def __call__(self, *args):
        from ...host.generate import call_component

        if len(args) == 1:  # an encoder or the token embedding
            return call_component(self.runtime, self.name, *args)
        return getattr(self.runtime, self.name)(*args)

    def reset_cache(self) -> None:
        self.runtime.reset()
