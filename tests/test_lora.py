"""LoRA on the tiny model: starts at the base model, trains only the adapters, switches off to give
the base model back exactly (the KL reference), merges into a plain checkpoint, and wires into
grpo.update with the reference taken from the same model. A role's updates carried into its next
phase as frozen factors give the model its merged checkpoint gives, and a second role over the same
base weights costs no weight memory."""

import copy

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import grpo
from conftest import PROMPTS, random_images
from machinery.fast_decode import StaticDecoder
from machinery.lora import (LoRALinear, TARGETS, adapters, add_lora, load_lora_state_dict,
                  lora_state_dict, merge_lora, set_past, shared_copy, updates)
from model import completion_logprobs, encode_prompts, load_vlm, rollout_logprobs
from machinery.keys import prompt_keys
from sampler import CacheDecoder, sample


def count_parameters(model):
    """(trainable, total) numbers of parameters; tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def completions(model, tok, ip, n=1, seed=0):
    """Prompts (each repeated n times) and n sampled completions of each: ids, mask [3n, T]."""
    prompts = encode_prompts(tok, ip, random_images(seed), PROMPTS)
    out = sample(model, prompts, n=n, max_new_tokens=8, keys=prompt_keys(seed, n=len(prompts)))
    return prompts.repeat(n), out.ids, out.mask


def logp(model, batch):
    with torch.no_grad():
        return completion_logprobs(model, *batch)


def train_adapters(model, batch, steps=5, lr=1e-2):
    """A toy loss: raise the log-prob of the given completions, adapters only."""
    params = add_lora(model, seed=0)
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        (-completion_logprobs(model, *batch).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return params


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_lora_linear_matches_a_float64_hand_computation():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    layer = LoRALinear(linear, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert layer.scale == 2.0 and layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4)
    assert torch.equal(layer.lora_B, torch.zeros(10, 4))
    # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), the bound nn.Linear uses
    assert 0.2 < layer.lora_A.abs().max() <= 12 ** -0.5
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would hide a wrong LoRA path
    x = torch.randn(3, 5, 12)
    W, b, A, B = (t.detach().double() for t in (linear.weight, linear.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + 2.0 * (x.double() @ A.T @ B.T)
    assert (layer(x).double() - expected).abs().max() < 1e-5
    layer.enabled = False
    assert (layer(x).double() - (x.double() @ W.T + b)).abs().max() < 1e-5

    # A bf16 base: the output is bf16, the trained masters and their gradients stay float32.
    layer.enabled = True
    layer.base.to(torch.bfloat16)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and (y.double() - expected).abs().max() < 0.05 * expected.abs().max()
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.lora_A.grad.abs().sum() > 0 and layer.base.weight.grad is None


def test_earlier_updates_add_to_the_layer_as_frozen_factors():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    layer = LoRALinear(linear, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert layer.factors()[0].shape == (0, 12)  # a fresh adapter (B = 0) adds nothing
    past_A, past_B = torch.randn(6, 12), torch.randn(10, 6)
    layer.past_A, layer.past_B = past_A, past_B
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 12)
    W, b, A, B = (t.detach().double() for t in (linear.weight, linear.bias, layer.lora_A, layer.lora_B))
    with_past = x.double() @ W.T + b + x.double() @ past_A.double().T @ past_B.double().T
    assert (layer(x).double() - (with_past + 2.0 * (x.double() @ A.T @ B.T))).abs().max() < 1e-5
    A_all, B_all = layer.factors()  # one factored update: the past's columns first, then scale · B
    assert A_all.shape == (10, 12) and torch.equal(A_all[:6], past_A) and torch.equal(B_all[:, 6:], 2.0 * layer.lora_B)
    assert (layer(x).double() - (x.double() @ (W + B_all.double() @ A_all.double()).T + b)).abs().max() < 1e-5
    layer.enabled = False  # off: the layer at the start of its phase, the past still on
    assert (layer(x).double() - with_past).abs().max() < 1e-5
    assert torch.equal(layer.factors()[0], past_A)
    layer.lora_A.sum().backward()
    assert not past_A.requires_grad and layer.past_A.grad is None


def test_merge_of_a_float64_layer_keeps_float64_precision():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10).double()
    W = linear.weight.detach().clone()
    model = nn.Sequential(LoRALinear(linear, rank=4, alpha=8, generator=torch.Generator().manual_seed(0)))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    merge_lora(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float64
    assert (model[0].weight - (W + 2.0 * B @ A)).abs().max() < 1e-12  # not rounded through float32


def test_at_init_the_model_is_the_base_model_and_only_adapters_train(tiny):
    model, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    batch = completions(base, tok, ip)
    params = add_lora(model)

    wrapped = lora_modules(model)
    assert len(wrapped) == model.config.text_config.num_hidden_layers * len(TARGETS)
    assert all(n.startswith("model.language_model.layers.") for n in wrapped)
    assert not any(isinstance(m, LoRALinear) for m in model.model.visual.modules())
    assert type(model.lm_head) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params)
    # grpo.make_optimizer keeps only trainable parameters: exactly the adapters
    optimizer = grpo.make_optimizer(model)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in params}
    trainable_count, total = count_parameters(model)
    assert trainable_count == sum(p.numel() for p in params) and total == trainable_count + count_parameters(base)[1]

    # B = 0: the same log-probs and the same greedy samples (the KV-cache path) as the base model
    ours = logp(model, batch)
    assert torch.equal(ours, logp(base, batch)) and ours[batch[2].bool()].isfinite().all()
    prompts = encode_prompts(tok, ip, random_images(1), PROMPTS)
    assert torch.equal(sample(model, prompts, max_new_tokens=6, temperature=0).ids,
                       sample(base, prompts, max_new_tokens=6, temperature=0).ids)

    # the same seed draws the same A; another seed others
    again, other = load_vlm("tiny", seed=0)[0], load_vlm("tiny", seed=0)[0]
    assert all(torch.equal(a, b) for a, b in zip(params, add_lora(again, seed=0)))
    assert not torch.equal(params[0], add_lora(other, seed=1)[0])
    with pytest.raises(ValueError, match="already has"):
        add_lora(model)
    with pytest.raises(ValueError, match="q_projj"):
        add_lora(load_vlm("tiny")[0], targets=("q_proj", "q_projj"))


def test_vision_adapters_only_when_asked(tiny):
    model, _, _ = tiny
    add_lora(model, targets=("q_proj", "visual.qkv"))
    wrapped = lora_modules(model)
    vision = [n for n in wrapped if n.startswith("model.visual.")]
    assert len(vision) == model.config.vision_config.depth and all(n.endswith("attn.qkv") for n in vision)
    assert len(wrapped) - len(vision) == model.config.text_config.num_hidden_layers


def test_trained_adapters_move_the_model_and_switch_off_to_the_exact_base(tiny):
    model, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    batch = completions(base, tok, ip)
    before = logp(base, batch)
    train_adapters(model, batch)
    trained = logp(model, batch)
    assert trained.sum() > before.sum() + 1.0  # the toy loss went down
    for name, module in lora_modules(model).items():  # the base weights did not move
        assert torch.equal(module.base.weight, base.get_submodule(name).weight)
    with adapters(model, False):
        assert torch.equal(logp(model, batch), before)  # the KL reference, exactly
    assert torch.equal(logp(model, batch), trained)  # and back on afterwards


def test_adapters_context_restores_each_previous_state(tiny):
    model, _, _ = tiny
    add_lora(model)
    modules = list(lora_modules(model).values())
    modules[0].enabled = False
    with adapters(model, True):
        assert all(m.enabled for m in modules)
        with adapters(model, False):
            assert not any(m.enabled for m in modules)
        assert all(m.enabled for m in modules)
    assert [m.enabled for m in modules] == [False] + [True] * (len(modules) - 1)
    with pytest.raises(RuntimeError):
        with adapters(model, False):
            raise RuntimeError
    assert [m.enabled for m in modules] == [False] + [True] * (len(modules) - 1)


def test_merge_gives_a_plain_checkpoint_with_the_same_outputs(tiny, tmp_path):
    model, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    batch = completions(base, tok, ip)
    train_adapters(model, batch)
    unmerged = logp(model, batch)

    merged = merge_lora(model)
    assert not lora_modules(merged)
    assert all(type(merged.get_submodule(n)) is nn.Linear for n, m in base.named_modules() if isinstance(m, nn.Linear))
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert (logp(merged, batch) - unmerged).abs().max() < 1e-5
    assert (logp(merged, batch) - logp(base, batch)).abs().max() > 1e-2

    for m, folder in ((merged, tmp_path / "merged"), (base, tmp_path / "base")):
        m.save_pretrained(folder)
    tok.save_pretrained(tmp_path / "merged")
    ip.save_pretrained(tmp_path / "merged")
    saved = {}
    for name in ("merged", "base"):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            saved[name] = set(f.keys())
    assert saved["merged"] == saved["base"]  # the checkpoint format of a plain model, no LoRA keys
    reloaded = load_vlm(str(tmp_path / "merged"))[0]
    assert (logp(reloaded, batch) - logp(merged, batch)).abs().max() < 1e-6


def test_lora_state_dict_round_trip_restores_outputs_exactly(tiny):
    model, tok, ip = tiny
    batch = completions(model, tok, ip)
    params = train_adapters(model, batch)
    state = lora_state_dict(model)
    trained = logp(model, batch)
    assert len(state) == len(params) and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert sum(v.numel() for v in state.values()) == count_parameters(model)[0]
    with torch.no_grad():
        params[1].add_(1.0)  # training on must not change the snapshot
    assert not torch.equal(logp(model, batch), trained)

    fresh = load_vlm("tiny", seed=0)[0]
    add_lora(fresh, seed=1)
    load_lora_state_dict(fresh, state)
    assert torch.equal(logp(fresh, batch), trained)
    with pytest.raises(ValueError, match="do not match"):
        load_lora_state_dict(fresh, {k: v for k, v in list(state.items())[1:]})


def test_grpo_update_trains_adapters_with_the_reference_from_the_same_model(tiny):
    model, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    train_adapters(model, completions(base, tok, ip, seed=1))  # policy != reference, so the KL is > 0
    prompts, ids, mask = completions(model, tok, ip, n=2)
    rollouts = grpo.Rollouts(prompts, ids, mask, torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=2,
                             max_new_tokens=ids.shape[1])
    advantages = rollouts.advantages()

    with adapters(model, False):
        ref_logp = rollout_logprobs(model, rollouts, 10**9, 1.0)
    assert torch.equal(ref_logp, rollout_logprobs(base, rollouts, 10**9, 1.0))
    old_logp = rollout_logprobs(model, rollouts, 10**9, 1.0)
    expected_kl = float(grpo.aggregate(grpo.kl_k3(old_logp, ref_logp), mask))  # ρ = 1 on the first step
    assert expected_kl > 1e-3

    twin = copy.deepcopy(model)  # the same policy, with a separate base copy as the reference
    results = []
    for policy, reference in ((model, ref_logp), (twin, rollout_logprobs(base, rollouts, 10**9, 1.0))):
        optimizer = grpo.make_optimizer(policy, lr=1e-3, weight_decay=0.0)
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        metrics = grpo.update(policy, optimizer, rollouts, advantages, reference, micro_batch_tokens=100, kl_coef=0.1)
        moved = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
        assert moved and all(".lora_" in n for n in moved)  # adapters trained, base frozen
        assert all(m.enabled for m in lora_modules(policy).values())
        results.append(metrics)
    assert abs(results[0]["kl"] - expected_kl) < 1e-6
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_fast_decode_reads_the_adapted_weights(tiny):
    model, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    add_lora(model, rank=4, alpha=8, seed=0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    prompts = encode_prompts(tok, ip, random_images(0), PROMPTS)
    runs = {}
    for enabled in (True, False):
        with adapters(model, enabled):
            reference = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, decoder=CacheDecoder)
            fast = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, decoder=StaticDecoder)
        assert torch.equal(fast.ids, reference.ids) and (fast.logprobs - reference.logprobs).abs().max() < 1e-4
        runs[enabled] = fast
    plain = sample(base, prompts, n=2, max_new_tokens=12, temperature=0, decoder=StaticDecoder)
    assert torch.equal(plain.ids, runs[False].ids) and torch.equal(plain.logprobs, runs[False].logprobs)
    # The decode step shares the base weights and keeps each adapter as its two factors.
    gate = model.model.language_model.layers[0].mlp.gate_proj
    step = StaticDecoder(model, prompts, 1, max_new_tokens=2).layers[0].gate
    assert step.weight.data_ptr() == gate.base.weight.data_ptr()
    assert torch.equal(step.down, gate.lora_A) and torch.allclose(step.up, gate.scale * gate.lora_B)
    assert (runs[True].logprobs - plain.logprobs).abs().max() > 1e-3, "the adapters must change the policy"


def test_fast_decode_with_adapters_on_some_projections_only(tiny):
    """q and v adapted, k not: in the stacked q/k/v projection each output sees its own adapter only."""
    model, tok, ip = tiny
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), seed=0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    prompts = encode_prompts(tok, ip, random_images(1), PROMPTS)
    reference = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, decoder=CacheDecoder)
    fast = sample(model, prompts, n=2, max_new_tokens=12, temperature=0, decoder=StaticDecoder)
    assert torch.equal(fast.ids, reference.ids) and (fast.logprobs - reference.logprobs).abs().max() < 1e-4


def train_phase(model, batch, past, seed, steps=3, lr=1e-2):
    """One phase of a LoRA role: adapters from `seed`, the role's earlier updates `past`, a few
    steps of the toy loss. Returns the role's updates after it."""
    params = add_lora(model, seed=seed)
    set_past(model, past)
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        (-completion_logprobs(model, *batch).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return updates(model)


def test_updates_carried_into_the_next_phase_give_the_merged_checkpoints_model(tiny):
    """Two phases of one role as selfplay.py runs them with LoRA: the second starts from the base
    plus the first's updates, and at each phase end the role equals its merged checkpoint."""
    _, tok, ip = tiny
    base = load_vlm("tiny", seed=0)[0]
    batch = completions(base, tok, ip)
    first = load_vlm("tiny", seed=0)[0]
    u1 = train_phase(first, batch, {}, seed=0)
    second = load_vlm("tiny", seed=0)[0]
    u2 = train_phase(second, batch, u1, seed=1)
    rank = 16  # add_lora's default r
    for name, factor in u1.items():  # the first phase's factors stay as they were, the second's follow
        old, new = (factor, u2[name]) if name.endswith("_A") else (factor.T, u2[name].T)  # rank first
        assert old.shape[0] == rank and new.shape[0] == 2 * rank and torch.equal(new[:rank], old)
    trained = logp(second, batch)
    with adapters(second, False):  # phase 2's KL reference: the role at its start, = merged phase 1
        assert (logp(second, batch) - logp(merge_lora(first), batch)).abs().max() < 1e-5
    assert (trained - logp(first, batch)).abs().max() > 1e-3
    # Its merged checkpoint: the base plus B @ A of the updates, summed in float64.
    merged = merge_lora(second)
    for layer in {name.rsplit(".", 1)[0] for name in u2}:
        delta = u2[f"{layer}.past_B"].double() @ u2[f"{layer}.past_A"].double()
        expected = base.get_submodule(layer).weight.double() + delta
        assert (merged.get_submodule(layer).weight.double() - expected).abs().max() < 1e-6
    assert (logp(merged, batch) - trained).abs().max() < 1e-5

    fresh = load_vlm("tiny", seed=0)[0]
    add_lora(fresh)
    with pytest.raises(ValueError, match="do not match"):
        set_past(fresh, dict(list(u2.items())[2:]))


def test_a_shared_copy_is_another_role_over_the_same_weights(tiny):
    model, tok, ip = tiny
    batch = completions(model, tok, ip)
    other = load_vlm("tiny", seed=0)[0]
    other_updates = train_phase(other, batch, {}, seed=3)  # the other role: its own trained updates
    train_adapters(model, batch)
    policy_logp = logp(model, batch)

    twin = shared_copy(model, other_updates)
    assert {id(p) for p in twin.parameters()} == {id(p) for p in model.parameters()}  # no weight copied
    assert twin.model.language_model.layers[0].mlp.up_proj.past_A.shape[0] == 16
    assert (logp(twin, batch) - logp(other, batch)).abs().max() < 1e-5  # it is the other role
    assert torch.equal(logp(model, batch), policy_logp)  # and the policy is unchanged
    with torch.no_grad():  # the policy trains on: the twin's trainable parts (the policy's) stay off
        for m in lora_modules(model).values():
            m.lora_B.add_(0.1)
    assert (logp(twin, batch) - logp(other, batch)).abs().max() < 1e-5
    base_twin = shared_copy(model, {})
    with adapters(model, False):
        assert torch.equal(logp(base_twin, batch), logp(model, batch))  # no updates: the base model
    # Greedy samples through the fast decode step: the same as the other role's own model.
    prompts = encode_prompts(tok, ip, random_images(2), PROMPTS)
    mine = sample(twin, prompts, n=2, max_new_tokens=10, temperature=0, decoder=StaticDecoder)
    theirs = sample(other, prompts, n=2, max_new_tokens=10, temperature=0, decoder=CacheDecoder)
    assert torch.equal(mine.ids, theirs.ids) and (mine.logprobs - theirs.logprobs).abs().max() < 1e-4
