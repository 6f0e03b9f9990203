"""GRPO, the maths: group advantages, the clipped surrogate with a KL term, and how per-token losses
become one number (METHOD.md, section 6, equations (14)-(22); the numbers below are METHOD.md's).

GRPO is PPO without a value network. For each prompt (an image for the Questioner, an image and a
question for the Reasoner) the policy samples a group of G completions; each completion's reward,
compared with the rest of its group, is the advantage of every one of its tokens.

Notation: a batch holds B completions padded to T tokens; mask[i, t] is 1 on the tokens of
completion i (never inferred from the ids). logp is log π_θ(o_t | q, o_<t) under the policy being
trained, old_logp the same under the policy that sampled the rollouts, ref_logp under the frozen
reference. Which model is the reference is the trainer's choice; this file only sees its log-probs.

    (14) advantage    A_i = (r_i - mean_g r) / (std_g r + eps)             g = the group of sample i
    (15) ratio        ρ_it = exp(logp_it - old_logp_it)
    (16) clip         l_it = max(-ρ_it A_i, -clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i)
    (17) dual clip    l_it = min(l_it, -c A_i)                              only where A_i < 0
    (18) KL (k3)      k_it = exp(ref_logp_it - logp_it) - (ref_logp_it - logp_it) - 1, in [-10, 10]
    (19) token loss   l_it + β k_it
    (20) aggregation  "seq-mean-token-mean"  L = 1/N_seq Σ_i 1/|o_i| Σ_t (19)    (default)
                      "token-mean"           L = 1/N_tok Σ_i Σ_t (19)
                      "seq-sum-over-max-len" L = 1/N_seq Σ_i 1/T_max Σ_t (19)   (Dr.GRPO)
    (21) accumulation L = Σ_k L_k over micro-batches k, when every L_k divides by the full batch's
                      N_seq, N_tok and T_max rather than by its own counts

N_seq counts the sequences with at least one token, N_tok the valid tokens, |o_i| the tokens of
sequence i, T_max the generation budget (the rollouts' max_new_tokens: one constant, as in
Dr.GRPO, not the longest completion of the batch). Defaults are the public code's: ε_low = 0.2,
ε_high = 0.3 ("clip-higher"), c = 3, β = 0.01; std is the unbiased one.

Simplified away or left out: no critic and no GAE (one scalar advantage per completion, the same
for all its tokens); no entropy bonus; the KL is a loss term, not a reward penalty; the ratio is
per token (not per sequence as in GSPO); no length penalty or overlong filtering. One addition not
in the equations: log-ratios are clamped to ±20 before exp, as EasyR1 does, for numerical safety.
"""

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from machinery import distributed as dist
from machinery import fsdp
from model import completion_logprobs, token_batches

# exp of a large log-ratio overflows to inf, and inf at a clipped or padded position turns into a
# nan gradient (0 * inf) even though that position's value is discarded. Past ±20 the clips in (16),
# (17) and (18) already give zero gradient (or, for A > 0 and ρ < e^-20, one below 3e-9·A), so the
# clamp changes nothing else; only with the dual clip off does it also stop a token past ρ = e^20.
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0  # k3 clamped to [-10, 10] (METHOD.md, eq. 18)

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-sum-over-max-len")


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Equation (14): each reward relative to its group. rewards: [n_groups, G] -> [n_groups, G].

    One row is one group (the G samples of one prompt); `.flatten()` gives one advantage per sample
    in group-major order, [B = n_groups * G].

    scale:
      "group": (r - group mean) / (group std + eps), METHOD.md's eq. 14 (the paper's formula).
      "batch": (r - group mean) / (std of all n_groups * G rewards + eps): groups with a small
               spread are not blown up to unit scale.
      "none":  r - group mean, unscaled (Dr.GRPO).
    The std is the unbiased (Bessel, n - 1) one, as torch.std and the reference code (EasyR1/verl).
    A group whose rewards are all equal gets advantage exactly 0 everywhere: it carries no signal.
    (Computed naively, the mean of eight float32 rewards of 0.9 is off by rounding noise that the
    std of 0 + eps blows up to -0.056 on every sample.) A lone sample (G = 1) has no unbiased std
    (0 / 0); its advantage is defined as 0 for the same reason. The arithmetic is float64, the
    result has the rewards' dtype.

    Worked example, one group of G = 4, one success: rewards [1, 0, 0, 0]
      mean 0.25, centred [0.75, -0.25, -0.25, -0.25]
      unbiased std = sqrt((0.75² + 3 · 0.25²) / 3) = sqrt(0.25) = 0.5
      "group" -> [1.5, -0.5, -0.5, -0.5]   (to within 3e-6: the eps)
      "none"  -> [0.75, -0.25, -0.25, -0.25]
    (the population std, 0.433, would give [1.73, -0.58, -0.58, -0.58].)
    """
    r = rewards.to(torch.float64)  # float32 rounding in the mean would be a fake signal
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [n_groups, 1]: no spread
    # even in float64 the mean of equal values can miss them by an ulp: set those groups to 0
    centred = torch.where(flat, 0.0, r - r.mean(dim=1, keepdim=True))  # [n_groups, G]
    if scale == "none":
        return centred.to(rewards.dtype)
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")
    pool = r if scale == "group" else r.reshape(1, -1)  # the rows a std is taken over
    if pool.shape[1] < 2:
        return torch.zeros_like(rewards)  # lone samples: centred reward is 0, std undefined
    std = pool.std(dim=1, keepdim=True)  # [n_groups, 1] or [1, 1], unbiased
    return (centred / (std + eps)).to(rewards.dtype)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Equation (18): the k3 estimate of KL(π_θ ‖ π_ref) at each sampled token. [B, T] -> [B, T].

    With x = ref_logp - logp, k3 = e^x - x - 1: its mean over tokens sampled from π_θ is the KL,
    and unlike the plain log-ratio it is never negative (e^x >= 1 + x), so only the upper clamp
    ever acts. Example: the reference gives the token twice the policy's probability,
    x = log 2 -> 2 - 0.693 - 1 = 0.307. Its gradient in logp is 1 - e^x: it pulls logp toward
    ref_logp, and stops (zero gradient) where the clamp at 10 is reached.
    """
    x = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    return (x.exp() - x - 1).clamp(-KL_CLAMP, KL_CLAMP)


def aggregate(token_values: Tensor, mask: Tensor, mode: str = "seq-mean-token-mean",
              n_seqs=None, n_tokens=None, max_len=None) -> Tensor:
    """Equation (20): per-token values [B, T] -> one scalar, over the tokens where mask [B, T] is 1.

    mode (the weight each valid token gets):
      "seq-mean-token-mean": 1 / (|o_i| · N_seq). Every sequence counts equally, however long;
                             sequences with no valid token are left out of N_seq.
      "token-mean":          1 / N_tok. Every token counts equally: long sequences weigh more.
      "seq-sum-over-max-len": 1 / (T_max · N_seq), one constant (Dr.GRPO): no length bias
                             from dividing by |o_i|.
    Example, lengths [1, 4] (5 tokens, 2 sequences, T_max 4): the lone token of sequence 0 and each
    token of sequence 1 weigh 1/2 and 1/8; 1/5 and 1/5; 1/8 and 1/8.

    n_seqs, n_tokens, max_len replace N_seq, N_tok, T_max (by default counted on this mask; T_max
    is mask.shape[1]). Pass the full batch's counts when this is one micro-batch of it: see
    `policy_loss`. Padded positions are dropped with `where`, so nan or inf there cannot leak in.
    An all-empty mask gives 0.
    """
    mask = mask.bool()
    values = torch.where(mask, token_values, 0.0)  # [B, T]
    if mode == "token-mean":
        if n_tokens is None:
            n_tokens = mask.sum().clamp(min=1)
        return values.sum() / n_tokens
    if mode == "seq-mean-token-mean":
        per_seq = values.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B], empty rows give 0
    elif mode == "seq-sum-over-max-len":
        per_seq = values.sum(dim=1) / (mask.shape[1] if max_len is None else max_len)  # [B]
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {mode!r}")
    if n_seqs is None:
        n_seqs = mask.any(dim=1).sum().clamp(min=1)
    return per_seq.sum() / n_seqs


def batch_totals(mask: Tensor, combine=None) -> dict:
    """The full batch's normalisers for `policy_loss`: N_seq, N_tok and T_max of mask [B, T].

    Compute once on the whole rollout batch, then pass to every micro-batch:
    `policy_loss(..., **batch_totals(full_mask))`. Counts are at least 1, so an empty batch gives
    loss 0 rather than 0 / 0. combine: when other processes hold the batch's other rows, the
    function that sums the counts [2] over them (distributed.total).
    """
    mask = mask.bool()
    counts = torch.stack([mask.any(dim=1).sum(), mask.sum()])  # [2]: N_seq, N_tok
    n_seqs, n_tokens = (counts if combine is None else combine(counts)).tolist()
    return dict(n_seqs_total=max(n_seqs, 1), n_tokens_total=max(n_tokens, 1), max_len=mask.shape[1])


def policy_loss(logp: Tensor, old_logp: Tensor, ref_logp, advantages: Tensor, mask: Tensor,
                clip_low: float = 0.2, clip_high: float = 0.3, dual_clip=3.0, kl_coef: float = 0.01,
                aggregation: str = "seq-mean-token-mean",
                n_seqs_total=None, n_tokens_total=None, max_len=None):
    """Equations (15)-(20): the GRPO loss of a batch of completions, and what to log about it.

    logp, old_logp: [B, T]    per-token log-probs under the policy and the sampling policy
    ref_logp:       [B, T]    under the frozen reference; None (or kl_coef = 0) drops the KL term
    advantages:     [B]       one per completion, the same for all its tokens
    mask:           [B, T]    1 on completion tokens
    dual_clip:      c > 1, or None to turn it off
    Returns (loss: 0-d tensor with grad, metrics: dict of python floats).

    The clip region, ε_low = 0.2, ε_high = 0.3, c = 3; the token loss, and where its gradient in
    logp is zero ("-"):
        A = +1:  ρ = 0.5 -> -0.5     ρ = 1.0 -> -1.0     ρ = 1.5 -> -1.3 (-)
        A = -1:  ρ = 0.5 ->  0.8 (-) ρ = 1.0 ->  1.0     ρ = 1.5 ->  1.5      ρ = 5 -> 3.0 (-)
    A token is no longer pushed once the update has moved it far enough the way its advantage asks
    (ρ above 1 + ε_high for A > 0, below 1 - ε_low for A < 0). It keeps being pushed the other way,
    except that for A < 0 the dual clip caps the loss at -c·A: a bad token whose probability has
    already grown c-fold stops contributing a gradient proportional to ρ.

    Gradient accumulation. By default the loss divides by this batch's own counts. To split a batch
    into micro-batches, pass the full batch's counts (`batch_totals`): each micro-batch loss is then
    exactly its share of the full-batch loss, and the summed micro-batch losses (not their mean)
    equal it, gradients included. Example, seq-mean-token-mean, 4 sequences with token means
    m0..m3, micro-batches {0} and {1, 2, 3}:
        full batch                 (m0 + m1 + m2 + m3) / 4
        own counts, summed          m0 / 1 + (m1 + m2 + m3) / 3        wrong: sequence 0 weighs 3x
        own counts, averaged       (m0 / 1 + (m1 + m2 + m3) / 3) / 2   still wrong
        n_seqs_total = 4, summed    m0 / 4 + (m1 + m2 + m3) / 4        exact
    Likewise n_tokens_total for "token-mean", and max_len for "seq-sum-over-max-len" when the
    micro-batches are padded to their own lengths. Rows are never split, so |o_i| stays local.

    Metrics, all detached:
      loss, pg_loss, kl        total, clipped surrogate (17) and k3 (18), with the loss's aggregation
      ppo_kl                   mean of old_logp - logp, how far this update has moved the policy
      ratio_mean, ratio_max    of ρ
      logp_diff_max            max |logp - old_logp|
      clip_frac_low            share of tokens with A < 0 and ρ < 1 - ε_low  (clipped, no gradient)
      clip_frac_high           share of tokens with A > 0 and ρ > 1 + ε_high (clipped, no gradient)
      dual_clip_frac           share of tokens with A < 0 and ρ > c           (capped, no gradient)
      neg_logp                 mean of -logp: an estimate of the policy's per-token entropy (exact
                               in expectation when on-policy and untruncated; no logits here)
    "mean" and "share" are token means over valid tokens, divided by n_tokens_total when given.
    With the full batch's counts every mean and share adds up over micro-batches to its full-batch
    value; the two maxima combine with max. Maxima are 0 for an empty mask.
    """
    mask = mask.bool()
    adv = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    diff = logp - old_logp  # [B, T]
    ratio = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # (15)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))  # (16)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)  # (17)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (18)
    token_loss = pg + kl_coef * kl  # (19); kl is still reported when kl_coef = 0

    def agg(x):
        return aggregate(x, mask, aggregation, n_seqs_total, n_tokens_total, max_len)

    loss = agg(token_loss)  # (20)

    with torch.no_grad():
        def token_mean(x):
            return aggregate(x.to(logp.dtype), mask, "token-mean", n_tokens=n_tokens_total)

        def masked_max(x):  # x >= 0 everywhere, so 0 is a neutral fill
            return torch.where(mask, x, 0.0).max()

        stats = {
            "loss": loss,
            "pg_loss": agg(pg),
            "kl": agg(kl),
            "ppo_kl": token_mean(-diff),
            "ratio_mean": token_mean(ratio),
            "ratio_max": masked_max(ratio),
            "logp_diff_max": masked_max(diff.abs()),
            "clip_frac_low": token_mean((ratio < 1 - clip_low) & (adv < 0)),
            "clip_frac_high": token_mean((ratio > 1 + clip_high) & (adv > 0)),
            "dual_clip_frac": (token_mean((ratio > dual_clip) & (adv < 0)) if dual_clip is not None
                               else torch.zeros((), dtype=logp.dtype, device=logp.device)),
            "neg_logp": token_mean(-logp),
        }
        # one stack, one host transfer, instead of a device sync per metric
        values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return loss, dict(zip(stats, values))


# -----------------------------------------------------------------------------
# One GRPO update over a batch of rollouts

@dataclass
class Rollouts:
    """B = n_groups * G completions in group-major order (row g * G + j is sample j of group g),
    the same for both roles.

    prompts:  a model.PromptBatch of B rows (each group's prompt repeated G times)
    ids, mask: [B, T] completion tokens, 1 up to and including the stop token
    rewards:  [B]
    max_new_tokens: the budget they were sampled with (T <= it; the sampler trims all-pad steps)
    """
    prompts: object
    ids: Tensor
    mask: Tensor
    rewards: Tensor
    group_size: int
    max_new_tokens: int

    def __len__(self):
        return self.ids.shape[0]

    def advantages(self, scale="group"):
        """[B]: equation (14) over the groups."""
        return group_advantages(self.rewards.view(-1, self.group_size), scale).flatten()


def autocast(device):
    """bf16 compute over float32 weights on CUDA; plain float32 elsewhere.

    At lr 1e-6 an update is ~1e-6 of a weight, below bf16's resolution (2^-8 relative): bf16
    weights would round most updates away. So the weights and AdamW's state stay float32 (the
    master copy) and only the matmuls run in bf16.
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def weights_dtype(device, trainable):
    """Trained weights are float32 (the master copy; autocast gives bf16 compute on CUDA); frozen
    ones are bf16 on a GPU, where memory is what they cost, and float32 elsewhere."""
    return torch.float32 if trainable or device.type != "cuda" else torch.bfloat16


def row_lengths(rollouts):
    """[B] prompt lengths (image tokens included) and [B] completion lengths."""
    return rollouts.prompts.attention_mask.sum(1).cpu(), rollouts.mask.sum(1)


def _micro_batch(rollouts, rows):
    """The rows of a rollout batch, completions trimmed to the longest of them."""
    T = max(int(rollouts.mask[rows].sum(1).max()), 1)
    return rollouts.prompts.select(rows.tolist()), rollouts.ids[rows, :T], rollouts.mask[rows, :T]


def _logprobs(model, rollouts, rows, temperature):
    """[len(rows), T] log-probs of the rows' completions (`_micro_batch`) and their mask, on the
    model's device. A model sharded by fsdp.shard scores through its own method, which gathers its
    weights."""
    device = model.device
    prompts, ids, mask = (x.to(device) for x in _micro_batch(rollouts, rows))
    score = getattr(model, "completion_logprobs", partial(completion_logprobs, model))
    with autocast(device):
        return score(prompts, ids, mask, temperature), mask


# What a process passes through a sharded model when it has fewer micro-batches than another
# (fsdp.py): its first row, with weight 0.
PADDING_ROWS = torch.zeros(1, dtype=torch.long)


@torch.no_grad()
def rollout_logprobs(model, rollouts, micro_batch_tokens, temperature):
    """[B, T] log-probs of every completion under `model`, computed micro-batch by micro-batch."""
    logp = torch.zeros(rollouts.ids.shape, dtype=torch.float32)
    micro_batches = token_batches(torch.arange(len(rollouts)), *row_lengths(rollouts), micro_batch_tokens)
    padding = fsdp.missing_passes(model, len(micro_batches))  # a collective: asked before the passes
    for rows in micro_batches:
        values, _ = _logprobs(model, rollouts, rows, temperature)
        logp[rows, :values.shape[1]] = values.float().cpu()
    for _ in range(padding):
        _logprobs(model, rollouts, PADDING_ROWS, temperature)
    return logp


def split_minibatches(positions, n_rows, n):
    """The rows of n mini-batches, consecutive slices of a batch of n_rows rows (tensor_split).
    positions: [b] long, where each row held here sits in the batch (arange(n_rows) when all are
    here; distributed.Share.rows for a process's share) -> n index tensors into those b rows: this
    process's rows of each mini-batch, possibly none."""
    ends = torch.tensor([len(s) for s in torch.arange(n_rows).tensor_split(n)]).cumsum(0)  # [n]
    which = torch.searchsorted(ends, positions, right=True)  # [b]: the mini-batch of each row
    return [torch.nonzero(which == i).flatten() for i in range(n)]


def update(policy, optimizer, rollouts, advantages, ref_logp=None, *, temperature=1.0, micro_batch_tokens=32768,
           minibatches=1, epochs=1, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01,
           aggregation="seq-mean-token-mean", max_grad_norm=1.0, positions=None):
    """GRPO on one rollout batch: `epochs` passes, each over `minibatches` optimizer steps.

    advantages: [B], one per completion. ref_logp: [B, T], the rollouts' log-probs under the frozen
    reference of the KL term (`rollout_logprobs` of a frozen copy, or of the policy itself with its
    LoRA adapters off); None, or kl_coef = 0, drops the term. The log-probs of the sampling policy
    (old) are, like the reference's, computed once, before the first step, so ρ = 1 on the first
    step: exactly with a single step, where old is the training forward's own, detached; up to
    rounding otherwise (in bf16, passes over other micro-batches can differ in the last bits).
    Mini-batches are consecutive slices of the batch (whole groups when B / minibatches is a
    multiple of G; at most B of them, so a small batch gives fewer steps); inside one,
    micro-batches (`model.token_batches`, up to `micro_batch_tokens` padded tokens each; many short
    rows to one forward pass, as the step is bound by the host issuing kernels) are summed with the
    mini-batch's own totals, so the gradient equals the gradient of the mini-batch in one piece
    (equation (21)). Then the gradient norm is clipped and the optimizer steps (equation (22)).

    With several processes (distributed.py) `rollouts` is this process's share of the batch and
    positions [B] long says where its rows sit in the whole batch (None: the whole batch is here).
    The mini-batches are then the whole batch's, each process taking its own rows of each; the
    totals of (21), the gradients (before the clip) and the metrics are summed over the processes.
    A policy sharded with --fsdp (fsdp.py) makes as many passes in every process.

    Returns the metrics of `policy_loss` averaged over the optimizer steps (maxima: the max), plus
    grad_norm (before clipping) and n_steps.
    """
    device = policy.device
    positions = torch.arange(len(rollouts)) if positions is None else positions
    n_rows = int(dist.total(torch.tensor(len(rollouts))))  # the whole batch's
    minibatches = min(minibatches, n_rows)  # a batch of few kept questions cannot fill more
    # With one optimizer step per batch the policy has not moved when the loss is taken: old = the
    # current log-probs, detached, and a whole forward pass over the batch is saved.
    on_policy = epochs * minibatches == 1
    old_logp = None if on_policy else rollout_logprobs(policy, rollouts, micro_batch_tokens, temperature)
    if kl_coef == 0:
        ref_logp = None
    prompt_lengths, lengths = row_lengths(rollouts)
    history = []
    policy.train()  # HF applies activation checkpointing in train mode only; Qwen has no dropout
    for _ in range(epochs):
        for minibatch in split_minibatches(positions, n_rows, minibatches):
            totals = batch_totals(rollouts.mask[minibatch], combine=dist.total)
            totals["max_len"] = rollouts.max_new_tokens  # Dr.GRPO's constant, not this batch's longest
            step = {}
            micro_batches = token_batches(minibatch, prompt_lengths, lengths, micro_batch_tokens)
            padding = fsdp.missing_passes(policy, len(micro_batches))
            for rows in micro_batches:
                logp, mask = _logprobs(policy, rollouts, rows, temperature)
                T = mask.shape[1]
                loss, metrics = policy_loss(
                    logp, logp.detach() if on_policy else old_logp[rows, :T].to(device),
                    None if ref_logp is None else ref_logp[rows, :T].to(device),
                    advantages[rows].to(device), mask, clip_low=clip_low, clip_high=clip_high,
                    dual_clip=dual_clip, kl_coef=kl_coef, aggregation=aggregation, **totals)
                loss.backward()
                for k, v in metrics.items():
                    step[k] = max(step.get(k, v), v) if k.endswith("_max") else step.get(k, 0.0) + v
            for _ in range(padding):
                logp, _ = _logprobs(policy, rollouts, PADDING_ROWS, temperature)
                (0 * logp.sum()).backward()
            if not fsdp.sharded(policy):  # a sharded model's are summed by FSDP's backward passes
                dist.sum_gradients(policy.parameters())  # then every process clips the same, global, norm
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = dist.sum_metrics(step)
            step["grad_norm"] = float(grad_norm)
            history.append(step)
    policy.eval()
    summary = {k: (max if k.endswith("_max") else lambda v: sum(v) / len(v))([h[k] for h in history])
               for k in history[0]}
    summary["n_steps"] = len(history)
    return summary


def make_optimizer(model, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01):
    """AdamW as in the paper (METHOD.md, eq. 22); constant learning rate (no scheduler). On CUDA
    the fused kernel: one pass over weights, gradients and both moments instead of one per
    arithmetic step."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=params[0].device.type == "cuda")
