"""The sampler against HF `generate`, against a recomputing forward, and against float64 maths."""

import numpy as np
import pytest
import torch
from conftest import PROMPTS, random_images

import sampler
from model import completion_logprobs, encode_prompts, load_vlm
from sampler import sample, sample_in_batches, truncate_logits


def generate_reference(model, prompts, max_new_tokens):
    mm_token_type_ids = (prompts.input_ids == model.config.image_token_id).int()
    out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                         pixel_values=prompts.pixel_values, image_grid_thw=prompts.image_grid_thw,
                         mm_token_type_ids=mm_token_type_ids, do_sample=False, max_new_tokens=max_new_tokens)
    return out[:, prompts.input_ids.shape[1]:]


def add_frequent_stops(model, samples, k=1):
    """Makes the k tokens that `samples`' rows produce most after their first step extra stop ids
    of `model`, so that rows sampled the same way stop early and at different steps."""
    values, counts = torch.unique(samples.ids[:, 1:][samples.mask[:, 1:].bool()], return_counts=True)
    config = model.generation_config
    config.eos_token_id = list(config.eos_token_id) + values[counts.argsort(descending=True)[:k]].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_generate(seed):
    model, tok, ip = load_vlm("tiny", seed=seed)
    sizes = [(64, 64), (100, 50), (30, 90), (57, 57)][: 2 + seed % 3]
    prompts = encode_prompts(tok, ip, random_images(seed, sizes), (PROMPTS + ["x"])[: len(sizes)])
    assert prompts.attention_mask.sum(1).unique().numel() > 1, "the batch must need left padding"
    ours = sample(model, prompts, n=1, max_new_tokens=24, temperature=0)
    reference = generate_reference(model, prompts, 24)
    assert ours.ids.shape == reference.shape
    assert torch.equal(ours.ids, reference)
    assert len({tuple(r) for r in ours.ids.tolist()}) > 1, "rows should differ: the images matter"


def test_greedy_with_stops_equals_generate():
    model, tok, ip = load_vlm("tiny", seed=3)
    prompts = encode_prompts(tok, ip, random_images(3), PROMPTS)
    first = sample(model, prompts, n=1, max_new_tokens=24, temperature=0)
    add_frequent_stops(model, first, k=1)
    ours = sample(model, prompts, n=1, max_new_tokens=24, temperature=0)
    assert ours.mask.sum(1).min() < 24, "some row must stop early for this test to mean anything"
    assert torch.equal(ours.ids, generate_reference(model, prompts, 24))


def test_greedy_samples_are_copies_of_one_greedy_answer(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    one = sample(model, prompts, n=1, max_new_tokens=16, temperature=0)
    many = sample(model, prompts, n=3, max_new_tokens=16, temperature=0)
    assert torch.equal(many.ids, one.ids.repeat_interleave(3, dim=0))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_recomputing_forward(tiny, temperature, top_p):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(4), PROMPTS)
    gen = torch.Generator().manual_seed(0)
    first = sample(model, prompts, n=4, max_new_tokens=20, temperature=temperature, top_p=top_p, generator=gen)
    add_frequent_stops(model, first, k=20)
    out = sample(model, prompts, n=4, max_new_tokens=20, temperature=temperature, top_p=top_p,
                 generator=torch.Generator().manual_seed(1))
    lengths = out.mask.sum(1)
    assert lengths.min() < lengths.max(), "need rows that stopped early"
    recomputed = completion_logprobs(model, prompts.repeat(4), out.ids, out.mask, temperature=temperature)
    assert (recomputed - out.logprobs).abs().max() <= 1e-4
    assert (out.logprobs[out.mask.bool()] < 0).all() and (out.logprobs[~out.mask.bool()] == 0).all()


def test_stop_tokens_end_rows_and_only_pad_follows(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(5), PROMPTS)
    first = sample(model, prompts, n=4, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    add_frequent_stops(model, first, k=20)
    stops = set(model.generation_config.eos_token_id)
    out = sample(model, prompts, n=4, max_new_tokens=20, generator=torch.Generator().manual_seed(0))
    pad = model.generation_config.pad_token_id
    stopped_rows = 0
    for ids, mask in zip(out.ids.tolist(), out.mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n), "mask must be 1 then 0"
        assert not stops & set(ids[: n - 1]), "no stop token before the last kept one"
        if n < len(mask):
            stopped_rows += 1
            assert ids[n - 1] in stops, "a row that ends early ends on its stop token"
            assert set(ids[n:]) == {pad}
    assert stopped_rows > 0


def test_same_seed_same_samples_and_samples_differ_from_the_first_token(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(6), PROMPTS)
    a = sample(model, prompts, n=8, max_new_tokens=12, generator=torch.Generator().manual_seed(7))
    b = sample(model, prompts, n=8, max_new_tokens=12, generator=torch.Generator().manual_seed(7))
    c = sample(model, prompts, n=8, max_new_tokens=12, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.ids, c.ids)
    for group in a.ids.view(len(prompts), 8, -1):
        assert group[:, 0].unique().numel() > 1, "the n samples of a prompt share their first token"


def test_prompt_is_prefilled_once_per_sample_call(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    calls = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    sample(model, prompts, n=8, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert calls == [prompts.pixel_values.shape[0]], "the vision encoder must run once, on every image once"


def test_suppressed_ids_are_never_sampled(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(1), PROMPTS)
    suppressed = torch.tensor(model.generation_config.suppress_tokens)
    vision_ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
    assert set(vision_ids) <= set(suppressed.tolist())
    assert suppressed.max() == model.config.text_config.vocab_size - 1 and len(tok) in suppressed.tolist()
    # Make the suppressed rows of the (tied) head win: copy the most likely token's row, scaled.
    greedy = sample(model, prompts, n=1, max_new_tokens=1, temperature=0).ids[:, 0]
    with torch.no_grad():
        model.lm_head.weight[suppressed] = 3.0 * model.lm_head.weight[greedy.mode().values]
    out = sample(model, prompts, n=8, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert not torch.isin(out.ids, suppressed).any()
    model.generation_config.suppress_tokens = []
    unmasked = sample(model, prompts, n=8, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert torch.isin(unmasked.ids, suppressed).any(), "without the mask they would be sampled"


def kept_set_float64(logits_row, top_k, top_p):
    """Reference: loops over tokens in float64, ranked by logit."""
    logits_row = [float(x) for x in logits_row]
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k:
        order = order[:top_k]
    m = max(logits_row[i] for i in order)
    weights = [np.exp(logits_row[i] - m) for i in order]
    total = sum(weights)
    kept, mass = set(), 0.0
    for i, w in zip(order, weights):
        if mass >= top_p:
            break
        kept.add(i)
        mass += w / total
    return kept, [abs(mass_above - top_p) for mass_above in np.cumsum(weights) / total]


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (10, 0.7), (0, 0.3), (3, 0.99)])
def test_truncation_keeps_the_float64_reference_set(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(64, 50, generator=gen) * 2
    kept = torch.isfinite(truncate_logits(logits, top_k, top_p))
    checked = 0
    for row in range(logits.shape[0]):
        reference, margins = kept_set_float64(logits[row], top_k, top_p)
        if top_p < 1.0 and min(margins) < 1e-5:  # float32 cannot decide a token on the boundary
            continue
        checked += 1
        assert set(kept[row].nonzero().flatten().tolist()) == reference
    assert checked > 50


def test_sampling_in_batches_equals_one_call_when_greedy(tiny, monkeypatch):
    model, tok, ip = tiny
    first = sample(model, encode_prompts(tok, ip, random_images(7), PROMPTS), max_new_tokens=12, temperature=0)
    add_frequent_stops(model, first, k=1)
    prompts = encode_prompts(tok, ip, random_images(7), PROMPTS)
    whole = sample(model, prompts, n=2, max_new_tokens=12, temperature=0)
    lengths = prompts.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3, "prompts of three lengths, so the calls reorder them"
    # The longest prompt alone, then the other two together; then each alone.
    two_shortest = 2 * 2 * (int(lengths.sort().values[1]) + 12)
    calls = []

    def counted(model, prompts, **settings):
        calls.append(len(prompts))
        return sample(model, prompts, **settings)
    monkeypatch.setattr(sampler, "sample", counted)
    for budget, prompts_per_call in ((two_shortest, [1, 2]), (1, [1, 1, 1])):
        calls.clear()
        batched = sample_in_batches(model, prompts, budget, n=2, max_new_tokens=12, temperature=0)
        assert calls == prompts_per_call
        assert torch.equal(batched.ids, whole.ids) and torch.equal(batched.mask, whole.mask)
        assert (batched.logprobs - whole.logprobs).abs().max() < 1e-4
    texts = batched.texts(tok)
    assert len(texts) == 6 and all("<|im_end|>" not in t and "<|endoftext|>" not in t for t in texts)
