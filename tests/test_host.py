"""Host logic (prompt, pixels, positions, golden vectors) against transformers' own code."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from autoglm_export.checkpoint import open_checkpoint
from autoglm_export.host.golden import golden_image, golden_vectors
from autoglm_export.host.image import ImagePreprocessing, preprocess_image
from autoglm_export.host.positions import decode_positions, mrope_positions
from autoglm_export.host.conversation import build_chat_prompt
from autoglm_export.host.prompt import IMAGE, TEXT
from conftest import REPO
from reference import hf_pixels, load_hf


def _tok(ckpt_dir):
    ckpt = open_checkpoint(ckpt_dir)
    return ckpt, ckpt.chat_tokenizer()


def test_prompt_follows_the_glm_chat_template(tiny_ckpt):
    _, tok = _tok(tiny_ckpt)
    p = build_chat_prompt(tok, "Open settings", image_tokens=3)
    text = tok.tok.decode(p.ids, skip_special_tokens=False)
    assert (
        text
        == "[gMASK]<sop><|user|>\n<|begin_of_image|>" + "<|image|>" * 3 + "<|end_of_image|>Open settings<|assistant|>\n"
    )
    assert p.types.count(IMAGE) == 3 and len(p.types) == len(p.ids)
    assert tok.decode(tok.encode("Tap the blue button")) == "Tap the blue button"


def test_pixels_match_transformers_image_processor(tiny_ckpt):
    for size in (56, 112):
        pre = ImagePreprocessing.from_checkpoint({}, size, 14, 2)
        for img in (golden_image(), golden_image(size, size)):
            ours = preprocess_image(img, pre)
            ref, grid = hf_pixels(img, size)
            n = ref.shape[0]
            assert grid.tolist() == [[1, size // 14, size // 14]]
            # transformers repeats the still frame twice (temporal patch 2); we fold that into the conv
            ref_one = ref.view(n, 3, 2, 196)
            assert torch.equal(ref_one[:, :, 0], ref_one[:, :, 1])
            assert np.abs(ours - ref_one[:, :, 0].reshape(n, -1).numpy()).max() < 1e-5


def test_positions_match_get_rope_index(tiny_ckpt):
    hf = load_hf(tiny_ckpt)
    merge = 2
    # text, image 4x6 (patch grid 8x12), text, image 2x2, text
    types = [TEXT] * 5 + [IMAGE] * 24 + [TEXT] * 3 + [IMAGE] * 4 + [TEXT] * 2
    grids = [(4, 6), (2, 2)]
    pos, delta = mrope_positions(types, grids)
    ids = torch.tensor([[1 if t == TEXT else hf.config.image_token_id for t in types]])
    ref, ref_delta = hf.model.get_rope_index(
        ids,
        mm_token_type_ids=torch.tensor([types]),
        image_grid_thw=torch.tensor([[1, gh * merge, gw * merge] for gh, gw in grids]),
    )
    assert np.array_equal(pos, ref[:, 0].numpy())
    assert delta == int(ref_delta.item())
    assert delta < 0  # images take fewer positions than tokens
    assert decode_positions(len(types), delta)[:, 0].tolist() == [len(types) + delta] * 3


def test_golden_vectors_script_is_deterministic(tiny_ckpt, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"golden{i}.json"
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_golden.py"), str(tiny_ckpt), str(out)],
            check=True,
            capture_output=True,
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    g = json.loads(outs[0])
    ckpt, tok = _tok(tiny_ckpt)
    pre = ImagePreprocessing.from_checkpoint({}, 112, 14, 2)
    assert g == json.loads(json.dumps(golden_vectors(tok, pre), sort_keys=True))
    assert g["pixel_values"]["shape"] == [64, 588]
    assert len(g["positions"][0]) == len(g["prompt_ids"]) and g["rope_delta"] == -12


def test_an_image_goes_to_the_bucket_closest_in_aspect_ratio():
    """Issue #30 item 2: aspect ratio on a log scale picks the bucket; the image is resized into it
    whole (no crop), and the manifest form of the buckets reads back the same."""
    from PIL import Image

    pre = ImagePreprocessing(sizes=((112, 112), (224, 112), (112, 224)))
    assert pre.choose(1080, 2400) == 1 and pre.choose(2400, 1080) == 2 and pre.choose(640, 480) == 0
    assert pre.choose(100, 141) == 0 and pre.choose(100, 142) == 1  # sqrt(2): halfway between 1:1 and 1:2
    x = pre.prepare(Image.new("RGB", (1080, 2400), (200, 10, 10)))
    assert (x.method, x.size, x.grid, x.tokens, x.pixels.shape) == (
        "vision_encoder_224x112",
        (224, 112),
        (8, 4),
        32,
        (128, 588),
    )
    assert np.allclose(x.pixels.reshape(128, 3, -1)[:, 0], (200 / 255 - 0.48145466) / 0.26862954, atol=1e-5)
    assert ImagePreprocessing.from_json(pre.to_json()) == pre
    assert [b["method"] for b in pre.to_json()["buckets"]] == [
        "vision_encoder",
        "vision_encoder_224x112",
        "vision_encoder_112x224",
    ]
