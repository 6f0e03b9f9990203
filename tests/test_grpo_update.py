"""grpo.update on the tiny model: micro-batching and activation checkpointing change no gradient."""

import copy
import dataclasses
import math

import torch
from conftest import PROMPTS, random_images

from grpo import Rollouts, batch_totals, policy_loss, update
from model import rollout_logprobs
from model import completion_logprobs, encode_prompts
from machinery.keys import prompt_keys
from sampler import sample


def rollout_batch(model, tok, ip, G=4):
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    out = sample(model, prompts, n=G, max_new_tokens=12, keys=prompt_keys(0, n=len(prompts)))
    rewards = torch.tensor([float(i % 3 == 0) + 0.1 * i for i in range(len(prompts) * G)])
    return Rollouts(prompts.repeat(G), out.ids, out.mask, rewards, group_size=G, max_new_tokens=12)


ONE_MICRO_BATCH = 10**9  # micro_batch_tokens that fit any batch


def step_delta(model, rollouts, reference, **kwargs):
    """Parameter change of one SGD step (lr 1): minus the clipped gradient."""
    policy = copy.deepcopy(model)
    before = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    temperature = kwargs.get("temperature", 1.0)
    ref_logp = None if reference is None else rollout_logprobs(reference, rollouts, ONE_MICRO_BATCH, temperature)
    metrics = update(policy, optimizer, rollouts, rollouts.advantages(), ref_logp, max_grad_norm=1e9, **kwargs)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]), metrics


def test_micro_batches_and_checkpointing_give_the_full_batch_gradient(tiny):
    model, tok, ip = tiny
    rollouts = rollout_batch(model, tok, ip)
    reference = copy.deepcopy(model)
    for aggregation in ("seq-mean-token-mean", "token-mean", "seq-sum-over-max-len"):
        full, metrics = step_delta(model, rollouts, reference, micro_batch_tokens=ONE_MICRO_BATCH,
                                   aggregation=aggregation)
        assert metrics["ratio_mean"] == 1.0 and metrics["kl"] == 0.0, "old and ref equal the policy on step 1"
        assert full.abs().max() > 0
        # one row per micro-batch, then micro-batches of several rows of unequal lengths
        for budget in (1, 4 * int(rollouts.prompts.attention_mask.sum(1).max() + rollouts.mask.sum(1).max())):
            micro, _ = step_delta(model, rollouts, reference, micro_batch_tokens=budget, aggregation=aggregation)
            assert torch.allclose(micro, full, atol=1e-6, rtol=1e-4), (aggregation, budget)

    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable()
    delta, _ = step_delta(checkpointed, rollouts, reference, micro_batch_tokens=ONE_MICRO_BATCH)
    plain, _ = step_delta(model, rollouts, reference, micro_batch_tokens=ONE_MICRO_BATCH)
    assert torch.allclose(delta, plain, atol=1e-6, rtol=1e-4)
    assert not model.training and not checkpointed.training, "update leaves the model in eval mode"


def test_dr_grpo_divides_by_the_generation_budget(tiny):
    """seq-sum-over-max-len's T_max is the budget the rollouts were sampled with, whatever their
    longest completion: four times the budget, a quarter of the step."""
    model, tok, ip = tiny
    rollouts = rollout_batch(model, tok, ip)
    settings = dict(micro_batch_tokens=ONE_MICRO_BATCH, aggregation="seq-sum-over-max-len")
    step, metrics = step_delta(model, rollouts, copy.deepcopy(model), **settings)
    longer_budget, longer_metrics = step_delta(model, dataclasses.replace(rollouts, max_new_tokens=48),
                                               copy.deepcopy(model), **settings)
    assert math.isclose(4 * longer_metrics["grad_norm"], metrics["grad_norm"], rel_tol=1e-5)
    assert step.abs().max() > 0.1 and torch.allclose(4 * longer_budget, step, atol=1e-6)


def test_the_step_trains_the_temperature_scaled_policy(tiny):
    """At temperature 0.7 the loss is that of the log-probs at 0.7, the reference's included:
    the step equals minus the gradient of policy_loss over completion_logprobs(temperature=0.7)."""
    model, tok, ip = tiny
    rollouts = rollout_batch(model, tok, ip)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference away from the policy, so the KL term has a gradient
        for p in reference.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    step, _ = step_delta(model, rollouts, reference, micro_batch_tokens=ONE_MICRO_BATCH, temperature=0.7)

    policy = copy.deepcopy(model)
    prompts, ids, mask = rollouts.prompts, rollouts.ids, rollouts.mask
    logp = completion_logprobs(policy, prompts, ids, mask, temperature=0.7)
    with torch.no_grad():
        ref_logp = completion_logprobs(reference, prompts, ids, mask, temperature=0.7)
    loss, _ = policy_loss(logp, logp.detach(), ref_logp, rollouts.advantages(), mask,
                          **batch_totals(mask))
    loss.backward()
    expected = torch.cat([-p.grad.flatten() for p in policy.parameters()])
    assert torch.allclose(step, expected, atol=1e-6, rtol=1e-4)
    at_one, _ = step_delta(model, rollouts, reference, micro_batch_tokens=ONE_MICRO_BATCH, temperature=1.0)
    assert (at_one - step).abs().max() > 100 * (step - expected).abs().max()


def test_more_minibatches_than_rows_gives_one_step_per_row(tiny):
    model, tok, ip = tiny
    rollouts = rollout_batch(model, tok, ip)
    settings = dict(micro_batch_tokens=ONE_MICRO_BATCH, kl_coef=0.0)
    too_many, metrics = step_delta(model, rollouts, None, minibatches=len(rollouts) + 4, **settings)
    one_per_row, _ = step_delta(model, rollouts, None, minibatches=len(rollouts), **settings)
    assert metrics["n_steps"] == len(rollouts) and torch.equal(too_many, one_per_row)


def test_checkpointing_recomputes_the_layers_and_shared_prompts_run_once(tiny, monkeypatch):
    model, tok, ip = tiny
    rollouts = rollout_batch(model, tok, ip)
    mlp_class = type(model.model.language_model.layers[0].mlp)
    forward, tokens = mlp_class.forward, []

    def counted(self, x):  # module hooks do not fire in the recompute; the forward itself does
        tokens.append(x.shape[0] * x.shape[1])
        return forward(self, x)

    monkeypatch.setattr(mlp_class, "forward", counted)
    counts = {}
    for enabled in (False, True):
        policy = copy.deepcopy(model)
        if enabled:
            policy.activation_checkpointing_enable()
        tokens.clear()
        step_delta(policy, rollouts, None, micro_batch_tokens=ONE_MICRO_BATCH, kl_coef=0.0)
        counts[enabled] = sum(tokens)
    layers, B = len(model.model.language_model.layers), len(rollouts)
    L, T = rollouts.prompts.input_ids.shape[1], int(rollouts.mask.sum(1).max())
    n_prompts, G = len(PROMPTS), rollouts.group_size
    # one step per batch: only the training forward (old = its own log-probs, detached). With
    # checkpointing every row runs whole (prompt and completion), and each layer once more in the
    # backward; without, each group's prompt runs once, then its G completions over its cache.
    assert counts[True] == 2 * layers * B * (L + T)
    assert counts[False] == layers * (n_prompts * L + B * (T - 1))
    assert B == n_prompts * G and G > 1
