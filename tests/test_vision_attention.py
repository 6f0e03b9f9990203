"""The vision tower's windowed attention in one call against HF's call per window."""

import torch
from conftest import PROMPTS, random_images

from machinery import vision_attention
from model import encode_prompts, load_vlm

# Grids of 4 × 4, 8 × 4, 4 × 8 and 10 × 6 patches: with the tiny model's 4 × 4-patch windows the
# last image has windows of 16, 8 and 4 patches, so the padded path is exercised too.
SIZES = ((64, 64), (100, 50), (30, 90), (200, 120))


def vision_outputs_and_grads(model, prompts):
    pixels = prompts.pixel_values.clone().requires_grad_(True)
    out = model.model.visual(pixels, grid_thw=prompts.image_grid_thw).pooler_output
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = [p.grad.clone() for p in model.model.visual.parameters()] + [pixels.grad]
    model.zero_grad()
    return out.detach(), grads


def test_windowed_attention_equals_hf_per_window_calls_in_float64():
    model, tok, ip = load_vlm("tiny", dtype=torch.float64)
    prompts = encode_prompts(tok, ip, random_images(0, SIZES), PROMPTS + ["x"])
    prompts.pixel_values = prompts.pixel_values.double()
    assert model.config.vision_config._attn_implementation == vision_attention.NAME
    ours, our_grads = vision_outputs_and_grads(model, prompts)
    model.config.vision_config._attn_implementation = "sdpa"  # HF's own path: a call per window
    hf, hf_grads = vision_outputs_and_grads(model, prompts)
    assert (ours - hf).abs().max() < 1e-10 * hf.abs().max()
    for a, b in zip(our_grads, hf_grads):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


def test_one_attention_call_per_layer(tiny, monkeypatch):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(1, SIZES), PROMPTS + ["x"])
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        model.model.visual(prompts.pixel_values, grid_thw=prompts.image_grid_thw)
        ours = len(calls)
        model.config.vision_config._attn_implementation = "sdpa"
        model.model.visual(prompts.pixel_values, grid_thw=prompts.image_grid_thw)
    assert ours == model.config.vision_config.depth
    assert len(calls) - ours > 2 * ours, "HF's path calls attention once per window"
