"""Tests of grpo.py's maths. Each formula is checked in float64 against a second derivation written
differently: plain Python loops over rows and tokens, and the clip written piecewise by case."""

import math
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402

DT = torch.float64
MODES = grpo.AGGREGATIONS


# ----------------------------------------------------------------------------------------------
# loop references

def ref_advantages(rewards, scale, eps):
    def unbiased_std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    everything = [x for group in rewards for x in group]
    out = []
    for group in rewards:
        m = sum(group) / len(group)
        if scale == "none":
            out.append([x - m for x in group])
            continue
        s = unbiased_std(group) if scale == "group" else unbiased_std(everything)
        out.append([(x - m) / (s + eps) for x in group])
    return out


def ref_k3(logp, ref_logp):
    x = ref_logp - logp
    return min(max(math.exp(x) - x - 1, -10.0), 10.0)


def ref_token_pg(logp, old_logp, a, eps_low, eps_high, c):
    """The clipped surrogate by case: for A >= 0 it is -A·min(ρ, 1+ε_high); for A < 0 it is
    |A|·max(ρ, 1-ε_low), capped at |A|·c by the dual clip."""
    rho = math.exp(logp - old_logp)
    if a >= 0:
        return -a * min(rho, 1 + eps_high)
    loss = -a * max(rho, 1 - eps_low)
    if c is not None:
        loss = min(loss, -a * c)
    return loss


def ref_aggregate(values, mask, mode):
    """values, mask: lists of lists [B][T]."""
    T = len(mask[0])
    rows = [[v for v, m in zip(vr, mr) if m] for vr, mr in zip(values, mask)]
    nonempty = [r for r in rows if r]
    if not nonempty:
        return 0.0
    if mode == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    if mode == "seq-sum-over-max-len":
        return sum(sum(r) / T for r in nonempty) / len(nonempty)
    raise AssertionError(mode)


def ref_policy_loss(logp, old_logp, ref_logp, adv, mask, mode, eps_low=0.2, eps_high=0.3, c=3.0,
                    beta=0.01):
    """Everything from Python lists; returns the loss and the metrics."""
    B, T = len(mask), len(mask[0])
    nan = float("nan")  # padding: never evaluated, and any use of it would show
    pg = [[ref_token_pg(logp[i][t], old_logp[i][t], adv[i], eps_low, eps_high, c)
           if mask[i][t] else nan for t in range(T)] for i in range(B)]
    kl = [[ref_k3(logp[i][t], ref_logp[i][t]) if mask[i][t] else nan for t in range(T)]
          for i in range(B)]
    total = [[pg[i][t] + beta * kl[i][t] for t in range(T)] for i in range(B)]
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i][t]]
    n = len(valid)
    rho = {(i, t): math.exp(logp[i][t] - old_logp[i][t]) for i, t in valid}
    return {
        "loss": ref_aggregate(total, mask, mode),
        "pg_loss": ref_aggregate(pg, mask, mode),
        "kl": ref_aggregate(kl, mask, mode),
        "ppo_kl": sum(old_logp[i][t] - logp[i][t] for i, t in valid) / n,
        "ratio_mean": sum(rho.values()) / n,
        "ratio_max": max(rho.values()),
        "logp_diff_max": max(abs(logp[i][t] - old_logp[i][t]) for i, t in valid),
        "clip_frac_low": sum(1 for i, t in valid if adv[i] < 0 and rho[i, t] < 1 - eps_low) / n,
        "clip_frac_high": sum(1 for i, t in valid if adv[i] > 0 and rho[i, t] > 1 + eps_high) / n,
        "dual_clip_frac": (sum(1 for i, t in valid if adv[i] < 0 and rho[i, t] > c) / n
                           if c is not None else 0.0),
        "neg_logp": sum(-logp[i][t] for i, t in valid) / n,
    }


def prefix_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # [B, T] bool


def random_batch(mask, seed, spread=0.7):
    """logp, old_logp, ref_logp [B, T], advantages [B]; padding filled with wild values."""
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    logp = -3 * torch.rand(B, T, generator=g, dtype=DT)
    old_logp = logp + spread * torch.randn(B, T, generator=g, dtype=DT)
    ref_logp = logp + 0.5 * torch.randn(B, T, generator=g, dtype=DT)
    adv = torch.randn(B, generator=g, dtype=DT)
    # garbage where mask is 0: must not reach the loss, the metrics or the gradients
    logp = torch.where(mask, logp, torch.full_like(logp, 500.0))
    old_logp = torch.where(mask, old_logp, torch.full_like(logp, -500.0))
    return logp, old_logp, ref_logp, adv


# ----------------------------------------------------------------------------------------------
# group advantages

def test_advantages_worked_example():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=DT)
    # mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    assert grpo.group_advantages(r, eps=0.0).tolist() == [[1.5, -0.5, -0.5, -0.5]]
    a = grpo.group_advantages(r)  # eps = 1e-6
    assert torch.allclose(a, torch.tensor([[0.75, -0.25, -0.25, -0.25]], dtype=DT) / 0.500001,
                          rtol=0, atol=1e-15)
    assert grpo.group_advantages(r, scale="none").tolist() == [[0.75, -0.25, -0.25, -0.25]]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_loop_reference(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 6, generator=g, dtype=DT)
    r[1] = (r[1] > 0.5).to(DT)  # a binary-reward group
    r[2] = 0.3  # a group with no spread
    r[3] *= 0.01  # a group with a small spread: "group" scales it up, "batch" does not
    got = grpo.group_advantages(r, scale=scale, eps=1e-6)
    want = torch.tensor(ref_advantages(r.tolist(), scale, 1e-6), dtype=DT)
    assert got.shape == (5, 6)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(got[2] == 0)  # all-equal rewards: no signal
    assert torch.allclose(got.sum(dim=1), torch.zeros(5, dtype=DT), atol=1e-12)  # centred per group


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_rewards_and_lone_samples_are_zero(scale):
    equal = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=DT)
    assert torch.equal(grpo.group_advantages(equal, scale=scale), torch.zeros(2, 3, dtype=DT))
    lone = torch.tensor([[1.0], [0.0], [0.5]], dtype=DT)  # G = 1: unbiased std undefined
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom <= 0" warning either
        a = grpo.group_advantages(lone, scale=scale)
    assert torch.equal(a, torch.zeros(3, 1, dtype=DT))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value, dtype, G", [(0.9, torch.float32, 8), (0.1, torch.float32, 8),
                                             (0.7, torch.float64, 7)])
def test_advantages_of_equal_rewards_are_exactly_zero_despite_rounding(scale, value, dtype, G):
    # float32: the mean of eight 0.9s is off by rounding noise, which std 0 + eps once blew up to
    # -0.056 per sample (0.1: -0.0074); float64: the mean of seven 0.7s is an ulp off 0.7
    spread = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0][:G]
    r = torch.tensor([[value] * G, spread], dtype=dtype)
    got = grpo.group_advantages(r, scale=scale)
    assert got.dtype == dtype
    assert torch.equal(got[0], torch.zeros(G, dtype=dtype))
    # the group with a spread still follows the formula (float64 loop reference, exact rewards)
    want = ref_advantages([[float(x) for x in row] for row in r], scale, 1e-6)[1]
    assert got[1].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_advantages_scale_is_checked():
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.zeros(2, 3), scale="global")


# ----------------------------------------------------------------------------------------------
# k3

def test_k3_matches_loop_and_clamps():
    g = torch.Generator().manual_seed(1)
    logp = -2 * torch.rand(4, 5, generator=g, dtype=DT)
    ref = logp + 1.5 * torch.randn(4, 5, generator=g, dtype=DT)
    ref[0, 0] = logp[0, 0] + 5.0  # e^5 - 6 = 142 -> clamped to 10
    ref[0, 1] = logp[0, 1] + 40.0  # beyond the log-ratio clamp too
    ref[0, 2] = logp[0, 2] - 40.0  # e^-20 + 19 -> clamped to 10
    ref[0, 3] = logp[0, 3] + math.log(2.0)  # the docstring's example
    logp.requires_grad_(True)
    k = grpo.kl_k3(logp, ref)
    want = [[ref_k3(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref.tolist())]
    assert torch.allclose(k, torch.tensor(want, dtype=DT), rtol=1e-12, atol=1e-12)
    assert k[0, :3].tolist() == [10.0, 10.0, 10.0]
    assert abs(k[0, 3].item() - (1 - math.log(2.0))) < 1e-15
    assert torch.all(k >= 0)
    k.sum().backward()
    x = (ref - logp).detach()
    grad_want = torch.where(k.detach() < 10, 1 - x.exp(), torch.zeros_like(x))  # d k3 / d logp
    assert torch.allclose(logp.grad, grad_want, rtol=1e-12, atol=1e-12)
    assert torch.all(logp.grad[0, :3] == 0) and torch.all(logp.grad[1:] != 0)


def test_identical_policies_give_ratio_one_and_kl_zero():
    mask = prefix_mask([3, 0, 5, 1], 5)
    logp, _, _, adv = random_batch(mask, seed=2)
    assert torch.equal(grpo.kl_k3(logp, logp), torch.zeros_like(logp))
    loss, m = grpo.policy_loss(logp, logp.clone(), logp.clone(), adv, mask)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0
    assert m["kl"] == 0.0 and m["ppo_kl"] == 0.0 and m["logp_diff_max"] == 0.0
    assert m["clip_frac_low"] == m["clip_frac_high"] == m["dual_clip_frac"] == 0.0
    # ρ = 1 everywhere: the loss is minus the mean advantage of the non-empty sequences
    assert math.isclose(loss.item(), -adv[[0, 2, 3]].mean().item(), rel_tol=1e-14)
    assert m["loss"] == m["pg_loss"] == loss.item()


# ----------------------------------------------------------------------------------------------
# the loss against the loop reference

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_kind", ["ragged", "scattered"])
def test_policy_loss_matches_loop_reference(mode, mask_kind):
    B, T = 9, 6
    if mask_kind == "ragged":
        mask = prefix_mask([3, 0, 6, 1, 4, 0, 2, 6, 5], T)
    else:  # holes in the middle of rows too, and still one empty row
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.6
        mask[4] = False
    logp, old, ref, adv = random_batch(mask, seed=4)
    loss, m = grpo.policy_loss(logp, old, ref, adv, mask, aggregation=mode)
    want = ref_policy_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                           mode)
    # the inputs reach every region of the clip, so each case of the reference is exercised
    assert want["clip_frac_low"] > 0 and want["clip_frac_high"] > 0 and want["dual_clip_frac"] > 0
    assert math.isclose(loss.item(), want["loss"], rel_tol=1e-12, abs_tol=1e-14)
    assert set(m) == set(want)
    for key, value in want.items():
        assert math.isclose(m[key], value, rel_tol=1e-12, abs_tol=1e-14), key
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_options_match_loop_reference(mode):
    """Other clip widths, no dual clip, no KL: the arguments are used, not the defaults."""
    mask = prefix_mask([2, 5, 0, 4, 1], 5)
    logp, old, ref, adv = random_batch(mask, seed=5, spread=1.5)
    L, l_, r_ = logp.tolist(), old.tolist(), ref.tolist()
    a, mk = adv.tolist(), mask.tolist()
    loss, m = grpo.policy_loss(logp, old, ref, adv, mask, clip_low=0.1, clip_high=0.5,
                               dual_clip=None, kl_coef=0.2, aggregation=mode)
    want = ref_policy_loss(L, l_, r_, a, mk, mode, eps_low=0.1, eps_high=0.5, c=None, beta=0.2)
    assert math.isclose(loss.item(), want["loss"], rel_tol=1e-12)
    assert m["dual_clip_frac"] == 0.0
    no_kl, m2 = grpo.policy_loss(logp, old, None, adv, mask, aggregation=mode)
    want2 = ref_policy_loss(L, l_, r_, a, mk, mode, beta=0.0)
    assert math.isclose(no_kl.item(), want2["loss"], rel_tol=1e-12)
    assert m2["kl"] == 0.0
    # kl_coef 0 with a reference: KL is reported but not in the loss
    zero_coef, m3 = grpo.policy_loss(logp, old, ref, adv, mask, kl_coef=0.0, aggregation=mode)
    assert zero_coef.item() == no_kl.item()
    assert math.isclose(m3["kl"], want["kl"], rel_tol=1e-12) and m3["kl"] > 0


def test_empty_rows_are_left_out_and_padding_ignored():
    mask = prefix_mask([3, 1, 4], 4)
    logp, old, ref, adv = random_batch(mask, seed=6)
    # the same batch with an empty row whose values are wild
    mask2 = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)])
    logp2 = torch.cat([logp, torch.full((1, 4), 1e3, dtype=DT)])
    old2 = torch.cat([old, torch.full((1, 4), -1e3, dtype=DT)])
    ref2 = torch.cat([ref, torch.full((1, 4), 1e3, dtype=DT)])
    adv2 = torch.cat([adv, torch.tensor([-7.0], dtype=DT)])
    for mode in MODES:
        loss, m = grpo.policy_loss(logp, old, ref, adv, mask, aggregation=mode)
        loss2, m2 = grpo.policy_loss(logp2, old2, ref2, adv2, mask2, aggregation=mode)
        assert loss2.item() == pytest.approx(loss.item(), rel=1e-14)
        for key in m:
            assert m2[key] == pytest.approx(m[key], rel=1e-14), key


def test_all_empty_mask_gives_zero_and_finite_grads():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    logp, old, ref, adv = random_batch(mask, seed=7)
    logp.requires_grad_(True)
    for mode in MODES:
        loss, m = grpo.policy_loss(logp, old, ref, adv, mask, aggregation=mode)
        assert loss.item() == 0.0 and all(v == 0.0 for v in m.values())
        logp.grad = None
        loss.backward()
        assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_aggregation_is_checked():
    with pytest.raises(ValueError):
        grpo.aggregate(torch.zeros(2, 3), torch.ones(2, 3), "sum")


# ----------------------------------------------------------------------------------------------
# gradients: zero on the clipped side and only there

# (advantage, ratio, dual clip, gradient should vanish); ε_low = 0.2, ε_high = 0.3
CLIP_CASES = [
    (+1.0, 0.5, 3.0, False),  # A > 0, ratio pushed down: still pulled up
    (+1.0, 1.1, 3.0, False),  # inside the trust region
    (+2.0, 1.5, 3.0, True),   # A > 0, already up by more than 1 + ε_high: clipped
    (+1.0, 5.0, 3.0, True),
    (-1.0, 0.5, 3.0, True),   # A < 0, already down by more than 1 - ε_low: clipped
    (-1.0, 0.9, 3.0, False),
    (-1.0, 1.5, 3.0, False),  # A < 0 above 1 + ε_high: keeps being pushed down
    (-0.5, 2.9, 3.0, False),  # just under the dual clip
    (-1.0, 4.0, 3.0, True),   # A < 0 above c: dual clip caps the loss
    (-1.0, 4.0, None, False),  # ... and without the dual clip it does not
    (-2.0, 0.7, None, True),
]


def one_token_rows(cases):
    """Each case is its own 1-token sequence: logp, old_logp [N, 1], advantages [N]."""
    adv = torch.tensor([c[0] for c in cases], dtype=DT)
    old = torch.linspace(-3.0, -0.5, len(cases), dtype=DT)[:, None]
    logp = (old + torch.tensor([math.log(c[1]) for c in cases], dtype=DT)[:, None])
    return logp.requires_grad_(True), old, adv


@pytest.mark.parametrize("case", CLIP_CASES)
def test_gradient_vanishes_exactly_on_the_clipped_side(case):
    a, rho, c, clipped = case
    # one case at a time, so the dual clip setting is the case's own
    logp, old, adv = one_token_rows([case])
    loss, m = grpo.policy_loss(logp, old, None, adv, torch.ones(1, 1), dual_clip=c)
    loss.backward()
    g = logp.grad.item()
    if clipped:
        assert g == 0.0
    else:  # d(-Aρ)/d logp = -Aρ
        assert math.isclose(g, -a * rho, rel_tol=1e-12)
    flagged = m["clip_frac_low"] + m["clip_frac_high"] + m["dual_clip_frac"]
    assert flagged == (1.0 if clipped else 0.0)


def test_gradient_weights_in_a_mixed_batch_and_kl_is_not_clipped():
    cases = [case for case in CLIP_CASES if case[2] == 3.0]
    n = len(cases)
    logp, old, adv = one_token_rows(cases)
    ref = logp.detach() - 0.3  # KL gradient: β (1 - e^{-0.3}) per token, clipped or not
    beta = 0.05
    loss, m = grpo.policy_loss(logp, old, ref, adv, torch.ones(n, 1), kl_coef=beta)
    loss.backward()
    for i, (a, rho, _, clipped) in enumerate(cases):
        pg = 0.0 if clipped else -a * rho
        want = (pg + beta * (1 - math.exp(-0.3))) / n  # every 1-token sequence weighs 1/n
        assert math.isclose(logp.grad[i, 0].item(), want, rel_tol=1e-12), cases[i]
    assert m["clip_frac_low"] == 1 / n and m["clip_frac_high"] == 2 / n
    assert m["dual_clip_frac"] == 1 / n


# ----------------------------------------------------------------------------------------------
# aggregation weights, by hand: lengths [1, 4, 0, 2], T = 4 (7 tokens, 3 non-empty sequences)

WEIGHTS = {
    "seq-mean-token-mean": [[1 / 3, 0, 0, 0], [1 / 12] * 4, [0] * 4, [1 / 6, 1 / 6, 0, 0]],
    "token-mean": [[1 / 7, 0, 0, 0], [1 / 7] * 4, [0] * 4, [1 / 7, 1 / 7, 0, 0]],
    "seq-sum-over-max-len": [[1 / 12, 0, 0, 0], [1 / 12] * 4, [0] * 4, [1 / 12, 1 / 12, 0, 0]],
}


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_weights(mode):
    mask = prefix_mask([1, 4, 0, 2], 4)
    want = torch.tensor(WEIGHTS[mode], dtype=DT)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 4, generator=g, dtype=DT, requires_grad=True)
    grpo.aggregate(x, mask, mode).backward()
    assert torch.allclose(x.grad, want, rtol=1e-14, atol=0)
    # the same weights through the loss: ρ = 1 and A = -1 make each token's loss ρ, gradient ρ = 1
    logp = torch.randn(4, 4, generator=g, dtype=DT, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, -torch.ones(4, dtype=DT), mask,
                               aggregation=mode)
    loss.backward()
    assert torch.allclose(logp.grad, want, rtol=1e-14, atol=0)


def test_seq_sum_over_max_len_uses_given_max_len():
    mask = prefix_mask([1, 2], 2)
    x = torch.ones(2, 2, dtype=DT)
    assert grpo.aggregate(x, mask, "seq-sum-over-max-len").item() == (1 / 2 + 2 / 2) / 2
    assert grpo.aggregate(x, mask, "seq-sum-over-max-len", max_len=8).item() == (1 / 8 + 2 / 8) / 2


# ----------------------------------------------------------------------------------------------
# micro-batched gradient accumulation equals the full-batch gradient

def toy_logp(layer, x, y):
    """A toy policy: per-token log-probs [B, T] of tokens y [B, T] from features x [B, T, d]."""
    return torch.log_softmax(layer(x), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def toy_setup(seed=8):
    g = torch.Generator().manual_seed(seed)
    B, T, d, V = 10, 7, 5, 11
    layer = torch.nn.Linear(d, V, dtype=DT)
    with torch.no_grad():  # seeded here rather than through the global RNG
        layer.weight.copy_(torch.randn(V, d, generator=g, dtype=DT))
        layer.bias.copy_(torch.randn(V, generator=g, dtype=DT))
    x = torch.randn(B, T, d, generator=g, dtype=DT)
    y = torch.randint(V, (B, T), generator=g)
    mask = prefix_mask([0, 3, 7, 1, 5, 2, 7, 4, 0, 6], T)  # the first micro-batch is one empty row
    with torch.no_grad():
        lp = toy_logp(layer, x, y)
        old = lp + 0.6 * torch.randn(B, T, generator=g, dtype=DT)  # off-policy enough to clip
        ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=DT)
    rewards = torch.rand(5, 2, generator=g, dtype=DT)
    adv = grpo.group_advantages(rewards).flatten()  # [B]
    return layer, x, y, mask, old, ref, adv


def accumulate(layer, x, y, mask, old, ref, adv, mode, splits, totals):
    """Backward over micro-batches of the given sizes, each padded only to its own longest row."""
    layer.zero_grad()
    start, metrics = 0, []
    for size in splits:
        rows = slice(start, start + size)
        T_k = max(int(mask[rows].sum(dim=1).max()), 1)
        cols = slice(0, T_k)
        lp = toy_logp(layer, x[rows, cols], y[rows, cols])
        loss, m = grpo.policy_loss(lp, old[rows, cols], ref[rows, cols], adv[rows],
                                   mask[rows, cols], aggregation=mode, **totals)
        loss.backward()
        metrics.append(m)
        start += size
    assert start == len(adv)
    return [p.grad.clone() for p in layer.parameters()], metrics


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_full_batch_gradient(mode):
    layer, x, y, mask, old, ref, adv = toy_setup()
    layer.zero_grad()
    loss, full = grpo.policy_loss(toy_logp(layer, x, y), old, ref, adv, mask, aggregation=mode)
    loss.backward()
    want = [p.grad.clone() for p in layer.parameters()]
    assert full["clip_frac_low"] > 0 and full["clip_frac_high"] > 0  # clipping is in play
    assert all(w.abs().max() > 1e-3 for w in want)

    totals = grpo.batch_totals(mask)
    assert totals == dict(n_seqs_total=8, n_tokens_total=35, max_len=7)
    for splits in ([1, 3, 2, 4], [10], [5, 5], [1] * 10):
        got, parts = accumulate(layer, x, y, mask, old, ref, adv, mode, splits, totals)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=0, atol=1e-12), splits
        # means and shares add up over micro-batches; maxima combine with max
        for key in ("loss", "pg_loss", "kl", "ppo_kl", "ratio_mean", "clip_frac_low",
                    "clip_frac_high", "dual_clip_frac", "neg_logp"):
            assert math.isclose(sum(p[key] for p in parts), full[key], rel_tol=1e-12,
                                abs_tol=1e-14), key
        for key in ("ratio_max", "logp_diff_max"):
            assert max(p[key] for p in parts) == full[key]


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_own_counts_do_not_match(mode):
    """The control: without the full batch's counts the accumulated gradient is wrong."""
    layer, x, y, mask, old, ref, adv = toy_setup()
    layer.zero_grad()
    grpo.policy_loss(toy_logp(layer, x, y), old, ref, adv, mask, aggregation=mode)[0].backward()
    want = [p.grad.clone() for p in layer.parameters()]
    got, _ = accumulate(layer, x, y, mask, old, ref, adv, mode, [1, 3, 2, 4], {})
    assert max((g - w).abs().max().item() for g, w in zip(got, want)) > 1e-4
