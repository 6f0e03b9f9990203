"""The sampler against HF `generate`, against a recomputing forward, and against float64 maths;
its random numbers against splitmix64 and against batch cuts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, random_images

import sampler
from model import completion_logprobs, encode_prompts, load_vlm
from machinery import keys as K
from machinery.keys import fold, prompt_keys
from sampler import draw, keep_top_k, nucleus, sample, sample_in_batches


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
    first = sample(model, prompts, n=4, max_new_tokens=20, temperature=temperature, top_p=top_p,
                   keys=prompt_keys(0, n=3))
    add_frequent_stops(model, first, k=20)
    out = sample(model, prompts, n=4, max_new_tokens=20, temperature=temperature, top_p=top_p,
                 keys=prompt_keys(1, n=3))
    lengths = out.mask.sum(1)
    assert lengths.min() < lengths.max(), "need rows that stopped early"
    recomputed = completion_logprobs(model, prompts.repeat(4), out.ids, out.mask, temperature=temperature)
    assert (recomputed - out.logprobs).abs().max() <= 1e-4
    assert (out.logprobs[out.mask.bool()] < 0).all() and (out.logprobs[~out.mask.bool()] == 0).all()


def test_stop_tokens_end_rows_and_only_pad_follows(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(5), PROMPTS)
    first = sample(model, prompts, n=4, max_new_tokens=20, keys=prompt_keys(0, n=3))
    add_frequent_stops(model, first, k=20)
    stops = set(model.generation_config.eos_token_id)
    out = sample(model, prompts, n=4, max_new_tokens=20, keys=prompt_keys(0, n=3))
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


def test_same_keys_same_samples_other_keys_other_samples_and_samples_differ_from_the_first_token(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(6), PROMPTS)
    a = sample(model, prompts, n=8, max_new_tokens=12, keys=prompt_keys(7, n=3))
    b = sample(model, prompts, n=8, max_new_tokens=12, keys=prompt_keys(7, n=3))
    c = sample(model, prompts, n=8, max_new_tokens=12, keys=prompt_keys(8, n=3))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    for x, y in zip(a.ids.view(3, 8, -1), c.ids.view(3, 8, -1)):
        assert not torch.equal(x, y), "each prompt's samples change with its key"
    for group in a.ids.view(len(prompts), 8, -1):
        assert group[:, 0].unique().numel() > 1, "the n samples of a prompt share their first token"
        assert len({tuple(r) for r in group.tolist()}) == 8, "two samples of a prompt are the same"
    # Sample j of a prompt draws from its own stream: with fewer samples, the first ones are unchanged.
    four = sample(model, prompts, n=4, max_new_tokens=12, keys=prompt_keys(7, n=3))
    assert torch.equal(four.ids, a.ids.view(3, 8, -1)[:, :4].reshape(12, -1)[:, :four.ids.shape[1]])


def test_sampling_without_keys_is_refused(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(6), PROMPTS)
    for keys in (None, prompt_keys(0, n=2)):
        with pytest.raises(ValueError, match="keys"):
            sample(model, prompts, n=2, max_new_tokens=2, keys=keys)


def test_prompt_is_prefilled_once_per_sample_call(tiny):
    model, tok, ip = tiny
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    calls = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    sample(model, prompts, n=8, max_new_tokens=5, keys=prompt_keys(0, n=3))
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
    for top_k, top_p in ((0, 1.0), (40, 1.0), (0, 0.99)):
        out = sample(model, prompts, n=8, max_new_tokens=8, top_k=top_k, top_p=top_p, keys=prompt_keys(0, n=3))
        assert not torch.isin(out.ids, suppressed).any()
    model.generation_config.suppress_tokens = []
    unmasked = sample(model, prompts, n=8, max_new_tokens=8, keys=prompt_keys(0, n=3))
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


def truncated(logits, top_k=0, top_p=1.0):
    """logits [N, V] -> the same with -inf outside each row's kept set (top-k, then top-p), built
    from the sampler's own keep_top_k and nucleus: the set `pick` draws from without building it."""
    logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        order, _, _, kept = nucleus(logits, top_p)
        drop_sorted = torch.arange(logits.shape[-1], device=logits.device) >= kept
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (10, 0.7), (0, 0.3), (3, 0.99)])
def test_truncation_keeps_the_float64_reference_set(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(64, 50, generator=gen) * 2
    kept = torch.isfinite(truncated(logits, top_k, top_p))
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


# Random numbers: per-prompt streams.

def splitmix64_reference(seed, count):
    """splitmix64 in Python's unbounded ints, reduced modulo 2^64 by hand: its first `count` outputs."""
    out, state = [], seed % 2**64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_int64_splitmix64_equals_the_unbounded_reference():
    """Torch's int64 ops (products that wrap, >> that copies the sign) must give splitmix64 exactly."""
    # The published first outputs for seed 1234567 (Vigna's splitmix64.c, Java's SplittableRandom).
    assert splitmix64_reference(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    for seed in (0, 1234567, 2**63 - 1, 2**63, 2**64 - 1, 0xDEADBEEFCAFEF00D):
        words = fold(torch.tensor(K._int64(seed)), torch.arange(40))
        assert [w % 2**64 for w in words.tolist()] == splitmix64_reference(seed, 40)
    keys = prompt_keys(5, 2, 9, n=4)
    u = keys.uniforms(3, 5)
    keys = keys.values
    h = 5
    for i in (2, 9):
        h = splitmix64_reference(h + i * 0x9E3779B97F4A7C15, 1)[0]
    assert keys.tolist() == [splitmix64_reference(h + i * 0x9E3779B97F4A7C15, 1)[0] % 2**63 for i in range(4)]
    assert (keys >= 0).all()
    for b, j, t in ((0, 0, 0), (3, 2, 4), (1, 1, 3)):
        stream = splitmix64_reference(int(keys[b]) + j * 0x9E3779B97F4A7C15, 1)[0]
        word = splitmix64_reference(stream + t * 0x9E3779B97F4A7C15, 1)[0]
        assert u[b * 3 + j, t].item() == (word >> 11) / 2**53


def test_prompt_keys_name_the_site_and_the_prompt():
    keys = prompt_keys(0, "questioner", 3, n=6).values
    assert torch.equal(keys[2:5], prompt_keys(0, "questioner", 3, n=5).values[2:5]), "key i must not depend on n"
    assert keys.unique().numel() == 6
    others = [prompt_keys(1, "questioner", 3, n=6), prompt_keys(0, "reasoner", 3, n=6),
              prompt_keys(0, "questioner", 4, n=6), prompt_keys(0, 3, "questioner", n=6)]
    for other in others:
        assert not set(other.values.tolist()) & set(keys.tolist())


def test_uniforms_look_uniform_and_independent():
    u = prompt_keys(0, n=1000).uniforms(10, 10)  # [10000, 10]: 100k draws
    x = u.flatten()
    N = x.numel()
    assert 0 <= x.min() and x.max() < 1
    assert abs(x.mean().item() - 0.5) < 5 * (1 / 12 / N) ** 0.5
    assert abs(x.var().item() - 1 / 12) < 5 * (1 / 180 / N) ** 0.5  # var of (x - 1/2)^2 is 1/180
    counts = torch.bincount((x * 16).long(), minlength=16).double()
    chi2 = ((counts - N / 16) ** 2 / (N / 16)).sum().item()
    assert chi2 < 37.7  # the 99.9% quantile of chi-square with 15 degrees of freedom
    # Neighbours in every direction (step, sample, prompt) are uncorrelated.
    grid = u.view(1000, 10, 10) - 0.5
    for a, b in ((grid[:, :, 1:], grid[:, :, :-1]), (grid[:, 1:], grid[:, :-1]), (grid[1:], grid[:-1])):
        corr = (a * b).mean() / (1 / 12)
        assert abs(corr.item()) < 5 / a.numel() ** 0.5


def inverse_cdf_float64(logits_row, top_k, top_p, u):
    """Reference: the kept set from kept_set_float64, renormalised in float64, ranked by logit (top-p)
    or in id order (no top-p), and the first token whose cumulative probability exceeds u.
    Returns the token and the distance of u * total to the nearest boundary."""
    kept, _ = kept_set_float64(logits_row, top_k, top_p)
    logits_row = [float(x) for x in logits_row]
    order = sorted(kept, key=lambda i: -logits_row[i]) if top_p < 1.0 else sorted(kept)
    m = max(logits_row[i] for i in order)
    cumulative = np.cumsum([np.exp(logits_row[i] - m) for i in order])
    cumulative /= cumulative[-1]
    index = int(np.searchsorted(cumulative, u, side="right"))
    return order[index], np.abs(cumulative - u).min()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9), (10, 0.7), (3, 0.99)])
def test_draw_is_the_float64_inverse_cdf_of_the_row_uniform(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(200, 50, generator=gen) * 2
    logits[:, ::7] = float("-inf")  # suppressed ids
    u = prompt_keys(top_k, int(top_p * 100), n=200).uniforms(1, 1)[:, 0]
    tokens, logp = draw(logits, 1.0, top_k, top_p, u)
    assert torch.equal(logp, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])
    checked = 0
    for row in range(len(logits)):
        reference, margin = inverse_cdf_float64(logits[row], top_k, top_p, u[row].item())
        if margin < 1e-5 or (top_p < 1.0 and min(kept_set_float64(logits[row], top_k, top_p)[1]) < 1e-5):
            continue  # float32 cannot decide a u on a boundary, nor a token on top-p's
        checked += 1
        assert tokens[row].item() == reference
    assert checked > 180


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.8), (5, 0.9)])
def test_draws_follow_the_truncated_distribution(top_k, top_p):
    """20k draws of one row with different keys: frequencies against float64 probabilities."""
    logits = torch.tensor([2.0, 1.5, 1.5, 0.3, -0.2, float("-inf"), 0.9, -1.0, 0.0, -2.5, float("-inf"), 1.1])
    N = 20000
    tokens, _ = draw(logits.expand(N, -1), 1.0, top_k, top_p, prompt_keys(42, n=N).uniforms(1, 1)[:, 0])
    kept, _ = kept_set_float64(logits, top_k, top_p)
    weights = np.array([np.exp(float(x)) if i in kept else 0.0 for i, x in enumerate(logits)])
    expected = weights / weights.sum()
    frequencies = np.bincount(tokens.numpy(), minlength=len(logits)) / N
    assert (frequencies[expected == 0] == 0).all(), "a token outside the kept set was drawn"
    sigma = np.sqrt(expected * (1 - expected) / N)
    assert (np.abs(frequencies - expected) <= 4.5 * sigma + 1e-12).all(), (frequencies, expected)
    positive = expected > 0
    chi2 = (((frequencies - expected)[positive] * N) ** 2 / (expected[positive] * N)).sum()
    quantile_999 = [None, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88]  # chi-square, by dof
    assert chi2 < quantile_999[int((expected > 0).sum()) - 1]


def six_prompts(model, tok, ip, seed):
    sizes = [(64, 64), (100, 50), (30, 90), (57, 57), (80, 40), (48, 48)]
    return encode_prompts(tok, ip, random_images(seed, sizes), PROMPTS + ["Describe it.", "x", "Count the shapes."])


def padded(samples, T, pad):
    extra = T - samples.ids.shape[1]
    return (F.pad(samples.ids, (0, extra), value=pad), F.pad(samples.mask, (0, extra)),
            F.pad(samples.logprobs, (0, extra)))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (20, 1.0)])
def test_samples_do_not_depend_on_how_the_prompts_are_cut(tiny, top_k, top_p):
    """One call, one prompt a call, or two calls in another order: the same samples for each prompt."""
    model, tok, ip = tiny
    prompts = six_prompts(model, tok, ip, 8)
    keys = prompt_keys(3, "test", n=6)
    settings = dict(n=4, max_new_tokens=16, top_k=top_k, top_p=top_p)
    add_frequent_stops(model, sample(model, prompts, keys=keys, **settings), k=15)
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 2, "the calls must pad differently"
    whole = sample_in_batches(model, prompts, 10**9, keys=keys, **settings)
    assert whole.mask.sum(1).min() < whole.mask.sum(1).max(), "rows must stop at different steps"
    alone = sample_in_batches(model, prompts, 1, keys=keys, **settings)
    later, first = (sample(model, prompts.select(rows), keys=keys[rows], **settings) for rows in ([3, 4, 5], [0, 1, 2]))
    T, pad = whole.ids.shape[1], model.generation_config.pad_token_id
    halves = [torch.cat(parts) for parts in zip(padded(first, T, pad), padded(later, T, pad))]
    for ids, mask, logprobs in (padded(alone, T, pad), halves):
        assert torch.equal(ids, whole.ids) and torch.equal(mask, whole.mask)
        assert (logprobs - whole.logprobs).abs().max() < 1e-4
