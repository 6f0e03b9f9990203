"""The static-cache decode step against HF's forward: same tokens, same log-probs."""

import pytest
import torch
from conftest import PROMPTS, random_images
from test_sampler import add_frequent_stops

from machinery import lora
from machinery.fast_decode import StaticDecoder
from model import completion_logprobs, encode_prompts, load_vlm, next_token_logits, suppressed_mask
from machinery.keys import prompt_keys
from sampler import CacheDecoder, sample


@pytest.mark.parametrize("seed", [0, 1])
def test_static_greedy_equals_the_reference_path(seed):
    model, tok, ip = load_vlm("tiny", seed=seed)
    sizes = [(64, 64), (100, 50), (30, 90)]
    prompts = encode_prompts(tok, ip, random_images(seed, sizes), PROMPTS)
    reference = sample(model, prompts, n=2, max_new_tokens=20, temperature=0, decoder=CacheDecoder)
    fast = sample(model, prompts, n=2, max_new_tokens=20, temperature=0, decoder=StaticDecoder)
    assert torch.equal(fast.ids, reference.ids) and torch.equal(fast.mask, reference.mask)
    assert (fast.logprobs - reference.logprobs).abs().max() < 1e-4


def test_static_hidden_states_match_step_by_step(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(2), PROMPTS)
    slow, fast = CacheDecoder(model, prompts, 3), StaticDecoder(model, prompts, 3, max_new_tokens=6)
    assert torch.allclose(slow.first_hidden, fast.first_hidden, atol=1e-5)
    tokens = torch.randint(0, len(tok), (len(prompts) * 3,), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        a, b = slow.step(tokens), fast.step(tokens)
        assert (a - b).abs().max() < 1e-4
        tokens = (tokens * 7 + 3) % len(tok)


@torch.no_grad()
def test_bf16_steps_over_float32_weights_as_on_a_gpu(tiny):
    """The GPU's setting (a float32 policy decoded in bf16), run on the CPU without a graph."""
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(3), PROMPTS)
    exact = StaticDecoder(model, prompts, 2, max_new_tokens=4)
    fast = StaticDecoder(model, prompts, 2, max_new_tokens=4, dtype=torch.bfloat16, cuda_graph=False)
    assert fast.first_hidden.dtype == fast.head_weight.dtype == torch.bfloat16
    assert fast.head_weight is fast.embed, "the tied head and embedding are cast to bf16 once"
    suppressed = suppressed_mask(model)
    tokens = torch.arange(len(prompts) * 2) + 100
    hidden = {"exact": exact.first_hidden, "fast": fast.first_hidden}
    for _ in range(3):
        logp = {name: torch.log_softmax(next_token_logits(h, source.head_weight, suppressed, 1.0), -1)
                for (name, h), source in zip(hidden.items(), (exact, fast))}
        total_variation = 0.5 * (logp["fast"].exp() - logp["exact"].exp()).abs().sum(-1)
        assert total_variation.max() < 0.05  # bf16 against float32
        hidden = {"exact": exact.step(tokens), "fast": fast.step(tokens)}


def test_static_sampling_with_stops_and_late_finish_checks(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(4), PROMPTS)
    first = sample(model, prompts, n=4, max_new_tokens=20, keys=prompt_keys(0, n=3))
    add_frequent_stops(model, first, k=40)
    out = sample(model, prompts, n=4, max_new_tokens=20, keys=prompt_keys(1, n=3), decoder=StaticDecoder)
    lengths = out.mask.sum(1)
    assert lengths.min() < lengths.max() and out.ids.shape[1] == lengths.max()
    recomputed = completion_logprobs(model, prompts.repeat(4), out.ids, out.mask)
    assert (recomputed - out.logprobs).abs().max() <= 1e-4
    pad = model.generation_config.pad_token_id
    assert (out.ids[out.mask == 0] == pad).all()
    # The keys, not the decoder, choose the tokens: the reference path draws the same ones.
    reference = sample(model, prompts, n=4, max_new_tokens=20, keys=prompt_keys(1, n=3), decoder=CacheDecoder)
    assert torch.equal(reference.ids, out.ids) and torch.equal(reference.mask, out.mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_path_matches_the_reference_in_bf16():
    model, tok, ip = load_vlm("tiny", device="cuda")
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS).to("cuda")
    reference = sample(model, prompts, n=2, max_new_tokens=8, temperature=0, decoder=CacheDecoder)
    fast = sample(model, prompts, n=2, max_new_tokens=8, temperature=0, decoder=StaticDecoder)
    assert (fast.ids[:, :4] == reference.ids[:, :4]).float().mean() >= 0.9
    same = (fast.ids == reference.ids).all(1)
    error = (fast.logprobs[same] - reference.logprobs[same]).abs()  # bf16 against float32, over 8 steps
    assert error.mean() < 0.05 and error.max() < 0.25


def adapted_on(device, dtype):
    """The tiny model as a LoRA role in iteration k >= 2 holds it: a frozen base in `dtype`, earlier
    updates as frozen factors, and a trained adapter (B != 0)."""
    model, tok, ip = load_vlm("tiny", device=device, dtype=dtype)
    lora.add_lora(model, rank=4, alpha=8, seed=0)
    generator = torch.Generator().manual_seed(3)
    past = {}
    for name, m in model.named_modules():
        if isinstance(m, lora.LoRALinear):
            past[f"{name}.past_A"] = 0.1 * torch.randn(2, m.base.in_features, generator=generator)
            past[f"{name}.past_B"] = 0.1 * torch.randn(m.base.out_features, 2, generator=generator)
            with torch.no_grad():
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=generator))
    lora.set_past(model, past)
    return model, tok, ip


def check_lora_factors_read_like_the_reference(device):
    model, tok, ip = adapted_on(device, torch.bfloat16)
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS).to(device)
    runs = {}
    for enabled in (True, False):
        with lora.adapters(model, enabled):
            reference = sample(model, prompts, n=2, max_new_tokens=8, temperature=0, decoder=CacheDecoder)
            runs[enabled] = fast = sample(model, prompts, n=2, max_new_tokens=8, temperature=0, decoder=StaticDecoder)
        agree = (fast.ids == reference.ids).cumprod(1).bool()  # up to a row's first different token
        assert agree[:, :4].float().mean() >= 0.9
        error = (fast.logprobs - reference.logprobs).abs()[agree]  # both bf16, different kernels
        assert error.mean() < 0.05 and error.max() < 0.25
    assert (runs[True].logprobs[:, 0] - runs[False].logprobs[:, 0]).abs().max() > 0.1, "the adapter must count"


def test_bf16_static_path_reads_lora_factors_like_the_reference():
    check_lora_factors_read_like_the_reference("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_path_reads_lora_factors_like_the_reference():
    """The same inside the CUDA graph, over a bf16 base on the GPU, as selfplay.py holds a LoRA role."""
    check_lora_factors_read_like_the_reference("cuda")
