"""Helpers shared by parity tests: transformers' Glm4vForConditionalGeneration is the reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.components import Shapes
from autoglm_export.host.generate import EagerRuntime, generate
from autoglm_export.host.image import ImagePreprocessing, preprocess_image
from autoglm_export.host.conversation import build_chat_prompt
from autoglm_export.load import build_on_meta, load_component


def load_ours(ckpt_dir: Path, shapes: Shapes):
    ckpt = open_checkpoint(ckpt_dir)
    mods = {
        c.name: load_component(build_on_meta(lambda c=c: c.build(ckpt.spec, shapes)), ckpt)
        for c in ckpt.family.components.for_spec(ckpt.spec)
    }
    return ckpt, mods


def load_hf(ckpt_dir: Path):
    from transformers import Glm4vForConditionalGeneration

    return Glm4vForConditionalGeneration.from_pretrained(str(ckpt_dir), dtype=torch.float32).eval()


def hf_pixels(image, size):
    """transformers' own PIL image processor on ``image`` resized to ``size`` (a side, or (height,
    width)): its smart resize keeps a size whose sides are multiples of 28 within its pixel bounds."""
    from transformers import Glm4vImageProcessorPil

    h, w = (size, size) if isinstance(size, int) else size
    proc = Glm4vImageProcessorPil(size={"shortest_edge": h * w, "longest_edge": 2 * h * w})
    from PIL import Image

    out = proc(images=[image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def scale_random_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw transformers' tiny init (std 0.02) so logits are spread and greedy has no near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(
                    (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    + 0.05 * torch.randn(p.shape, generator=g)
                )
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                gain = 4.0 if name == "lm_head.weight" else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(math.prod(p.shape[1:])))


def check_parity(ours_dir: Path, hf_dir: Path, image_size=112, tol: float = 1e-4, new_tokens: int = 16):
    """Vision, prefill, 8 decode steps and a greedy image+text generation vs transformers.
    ``image_size``: a side, or (height, width) for a non-square image bucket."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    shapes = Shapes(images=(size,), max_context=128, prefill_chunk=16)
    ckpt, mods = load_ours(ours_dir, shapes)
    hf = load_hf(hf_dir)
    spec = ckpt.spec
    figures = {}

    # vision encoder on real preprocessed pixels
    from autoglm_export.host.golden import golden_image

    img = golden_image()
    pre = ImagePreprocessing.from_checkpoint({}, [size], spec.vision.patch_size, spec.vision.spatial_merge_size)
    px = preprocess_image(img, pre)
    ref_px, grid = hf_pixels(img, size)
    f = spec.vision.patch_size
    assert grid.tolist() == [[1, size[0] // f, size[1] // f]], grid
    figures["pixels"] = (
        (ref_px.view(px.shape[0], 3, 2, -1)[:, :, 0].reshape(px.shape[0], -1) - torch.from_numpy(px)).abs().max().item()
    )
    with torch.no_grad():
        ref = hf.model.get_image_features(ref_px, grid).pooler_output[0]
        ours = mods["vision_encoder"](torch.from_numpy(px))
    figures["vision"] = (ref - ours).abs().max().item()

    # prefill + 8 decode steps on text, logits of every step
    ids = torch.randint(0, spec.tokens.image_start_token_id - 1, (1, 11), generator=torch.Generator().manual_seed(1))
    dec = mods["text_decoder"]
    dec.reset_cache()
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
        pos = torch.arange(ids.shape[1])
        logits = dec(mods["token_embedding"](ids), pos.expand(3, -1).contiguous(), pos)
        worst = (out.logits[:, -1] - logits).abs().max().item()
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for s in range(8):
            o = hf(input_ids=nxt, past_key_values=pkv, use_cache=True)
            c = torch.tensor([ids.shape[1] + s])
            lg = dec(mods["token_embedding"](nxt), c.expand(3, 1).contiguous(), c)
            worst = max(worst, (o.logits[:, -1] - lg).abs().max().item())
            pkv, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
    figures["text"] = worst

    # greedy generation from image + text
    tok = ckpt.chat_tokenizer()
    prompt = build_chat_prompt(tok, "What is on the screen?", pre.num_tokens)
    trace = generate(
        EagerRuntime(mods, shapes.max_context, shapes.prefill_chunk),
        prompt,
        images=[px],
        image_grids=[pre.merged_grid],
        max_new_tokens=new_tokens,
    )
    input_ids = torch.tensor([prompt.ids])
    hf_out = hf.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=ref_px,
        image_grid_thw=grid,
        mm_token_type_ids=torch.tensor([prompt.types]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
    )
    figures["ours_tokens"] = trace.tokens
    figures["hf_tokens"] = hf_out[0, len(prompt) :].tolist()
    assert figures["pixels"] <= 1e-5, figures
    assert figures["vision"] <= tol, figures
    assert figures["text"] <= tol, figures
    assert figures["ours_tokens"] == figures["hf_tokens"], figures
    return figures


def pixel_diff(a: np.ndarray, b) -> float:
    return float(np.abs(a - np.asarray(b)).max())
