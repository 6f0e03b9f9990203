"""GRPO, the maths: group advantages, the clipped surrogate with a KL term, and how per-token losses
become one number (METHOD.md, section 6, equations (14)-(22), where each is worked through).

GRPO is PPO without a value network: for each prompt the policy samples a group of G completions,
and each one's reward, compared with the rest of its group, is the advantage of all its tokens.
A batch holds B completions padded to T tokens, mask [B, T] 1 on their tokens; logp, old_logp and
ref_logp [B, T] are log π(o_t | q, o_<t) under the policy in training, the policy that sampled
them, and the frozen reference (whichever model the trainer chose: this file sees its log-probs).

    (14) advantage    A_i = (r_i - mean_g r) / (std_g r + eps)             g = the group of sample i
    (15) ratio        ρ_it = exp(logp_it - old_logp_it)
    (16) clip         l_it = max(-ρ_it A_i, -clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i)
    (17) dual clip    l_it = min(l_it, -c A_i)                              only where A_i < 0
    (18) KL (k3)      k_it = exp(ref_logp_it - logp_it) - (ref_logp_it - logp_it) - 1, in [-10, 10]
    (19) token loss   l_it + β k_it
    (20) aggregation  "seq-mean-token-mean"  L = 1/N_seq Σ_i 1/|o_i| Σ_t (19)    (default)
                      "token-mean"           L = 1/N_tok Σ_i Σ_t (19)
                      "seq-sum-over-max-len" L = 1/N_seq Σ_i 1/T_max Σ_t (19)   (Dr.GRPO)
    (21) accumulation L = Σ_k L_k over micro-batches k, each dividing by the full batch's counts

N_seq counts the sequences with a token, N_tok the tokens, T_max is the generation budget. The
defaults are the public code's (ε_low 0.2, ε_high 0.3, c 3, β 0.01, the unbiased std). Left out: a
critic, an entropy bonus, a KL penalty in the reward, per-sequence ratios, length penalties.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from model import PADDING_ROWS, rollout_logprobs, row_lengths, rows_logprobs, token_batches

# Log-ratios are clamped before exp (as EasyR1): the clips give no gradient there anyway, and an inf
# at a masked position would make a nan gradient (0 * inf).
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0  # k3 clamped to [-10, 10] (METHOD.md, eq. 18)
AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-sum-over-max-len")


def group_advantages(rewards: Tensor, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Equation (14): rewards [n_groups, G] (a row per prompt) -> advantages [n_groups, G]. scale
    "group": (r - group mean) / (group std + eps), the paper's; "batch": over the std of all the
    rewards (a group with a small spread is not blown up); "none": r - group mean (Dr.GRPO). A group
    of equal rewards gets exactly 0 (naively, eight float32 0.9s give -0.056: the mean's rounding
    over a std of 0 + eps), as does a lone sample. Example: [1, 0, 0, 0] -> [1.5, -0.5, -0.5, -0.5]."""
    r = rewards.to(torch.float64)
    flat = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [n_groups, 1]: no spread
    centred = torch.where(flat, 0.0, r - r.mean(dim=1, keepdim=True))  # [n_groups, G]
    if scale == "none":
        return centred.to(rewards.dtype)
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', not {scale!r}")
    pool = r if scale == "group" else r.reshape(1, -1)  # the rows a std is taken over
    if pool.shape[1] < 2:
        return torch.zeros_like(rewards)  # lone samples: no unbiased std
    return (centred / (pool.std(dim=1, keepdim=True) + eps)).to(rewards.dtype)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Equation (18), the k3 estimate of KL(π_θ ‖ π_ref) per sampled token: [B, T] -> [B, T].
    With x = ref_logp - logp, e^x - x - 1 >= 0, and its mean over tokens sampled from π_θ is the
    KL. Example: the reference twice as likely, x = log 2 -> 2 - 0.693 - 1 = 0.307."""
    x = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (x.exp() - x - 1).clamp(-KL_CLAMP, KL_CLAMP)


def aggregate(token_values: Tensor, mask: Tensor, mode: str = "seq-mean-token-mean",
              n_seqs=None, n_tokens=None, max_len=None) -> Tensor:
    """Equation (20): token_values [B, T] -> a scalar over the tokens where mask [B, T] is 1. A
    token of sequence i weighs 1 / (|o_i| N_seq), 1 / N_tok, or 1 / (T_max N_seq) by mode (lengths
    [1, 4]: 1/2 and 1/8, 1/5 and 1/5, 1/8 and 1/8). n_seqs, n_tokens, max_len: a larger batch's
    counts (`batch_totals`). Padding goes through `where`, so nan or inf there cannot leak in."""
    mask = mask.bool()
    values = torch.where(mask, token_values, 0.0)  # [B, T]
    if mode == "token-mean":
        return values.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    if mode == "seq-mean-token-mean":
        per_seq = values.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B], empty rows give 0
    elif mode == "seq-sum-over-max-len":
        per_seq = values.sum(dim=1) / (mask.shape[1] if max_len is None else max_len)  # [B]
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {mode!r}")
    return per_seq.sum() / (mask.any(dim=1).sum().clamp(min=1) if n_seqs is None else n_seqs)


def batch_totals(mask: Tensor, combine=None) -> dict:
    """The full batch's N_seq, N_tok and T_max of mask [B, T], for every micro-batch's
    `policy_loss(..., **batch_totals(full_mask))` (at least 1 each: an empty batch has loss 0).
    combine: sums the counts [2] over the processes holding the batch's other rows."""
    mask = mask.bool()
    counts = torch.stack([mask.any(dim=1).sum(), mask.sum()])  # [2]: N_seq, N_tok
    n_seqs, n_tokens = (counts if combine is None else combine(counts)).tolist()
    return dict(n_seqs_total=max(n_seqs, 1), n_tokens_total=max(n_tokens, 1), max_len=mask.shape[1])


def policy_loss(logp: Tensor, old_logp: Tensor, ref_logp, advantages: Tensor, mask: Tensor,
                clip_low: float = 0.2, clip_high: float = 0.3, dual_clip=3.0, kl_coef: float = 0.01,
                aggregation: str = "seq-mean-token-mean", n_seqs_total=None, n_tokens_total=None, max_len=None):
    """Equations (15)-(20): the loss of a batch of completions -> (0-d tensor, metrics: floats).

    logp, old_logp, ref_logp, mask [B, T] (ref_logp None or kl_coef 0: no KL term); advantages [B];
    dual_clip c > 1 or None. A token stops being pushed once it moved far enough the way its
    advantage asks (ρ > 1 + ε_high for A > 0, ρ < 1 - ε_low for A < 0); for A < 0 the loss is also
    capped at -c A. With the full batch's counts (`batch_totals`) a micro-batch's loss and metrics
    are their exact share of the batch's: summed, not averaged, they give the batch's (21). Metrics:
    pg_loss (17), kl (18), ppo_kl (mean old_logp - logp), ρ's mean and max, the shares of tokens
    clipped each way, neg_logp (the mean of -logp, an estimate of the entropy).
    """
    mask = mask.bool()
    adv = advantages.unsqueeze(1)  # [B, 1], broadcast over tokens
    diff = logp - old_logp  # [B, T]
    ratio = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # (15)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))  # (16)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)  # (17)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # (18)
    agg = partial(aggregate, mask=mask, mode=aggregation, n_seqs=n_seqs_total, n_tokens=n_tokens_total,
                  max_len=max_len)
    loss = agg(pg + kl_coef * kl)  # (19), (20); kl is still reported when kl_coef = 0

    with torch.no_grad():
        def token_mean(x):
            return aggregate(x.to(logp.dtype), mask, "token-mean", n_tokens=n_tokens_total)

        def masked_max(x):  # x >= 0 everywhere, so 0 is a neutral fill
            return torch.where(mask, x, 0.0).max()
        stats = {
            "loss": loss, "pg_loss": agg(pg), "kl": agg(kl), "ppo_kl": token_mean(-diff),
            "ratio_mean": token_mean(ratio), "ratio_max": masked_max(ratio), "logp_diff_max": masked_max(diff.abs()),
            "clip_frac_low": token_mean((ratio < 1 - clip_low) & (adv < 0)),
            "clip_frac_high": token_mean((ratio > 1 + clip_high) & (adv > 0)),
            "dual_clip_frac": (token_mean((ratio > dual_clip) & (adv < 0)) if dual_clip is not None
                               else torch.zeros((), dtype=logp.dtype, device=logp.device)),
            "neg_logp": token_mean(-logp),
        }
        values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()  # one host sync
    return loss, dict(zip(stats, values))


# -----------------------------------------------------------------------------
# One GRPO update over a batch of rollouts

@dataclass
class Rollouts:
    """B = n_groups * G completions in group-major order (row g * G + j is sample j of group g).
    prompts: a model.PromptBatch of B rows (each group's prompt G times); ids, mask: [B, T]; rewards:
    [B]; max_new_tokens: the budget they were sampled with (T <= it)."""
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


@dataclass(frozen=True)
class Reduce:
    """How `update` adds up its work with other processes' when the batch is shared among them
    (machinery/distributed.py fills it in); the defaults are one process's, which has none to add."""
    positions: Callable = torch.arange  # n -> [n]: where the n rows held here sit in the whole batch
    total: Callable = lambda tensor: tensor  # summed over the processes
    extra_passes: Callable = lambda model, n: 0  # forward passes to add to n so that all make as many
    sum_gradients: Callable = lambda parameters: None  # in place, over the processes
    sum_metrics: Callable = lambda metrics: metrics  # {name: float}: sums (maxima: the max)


def split_minibatches(positions, n_rows, n):
    """n mini-batches, consecutive slices of a batch of n_rows rows. positions [b]: where the rows
    held here sit in the batch -> for each mini-batch, the indices of its rows among those b."""
    ends = torch.tensor([len(s) for s in torch.arange(n_rows).tensor_split(n)]).cumsum(0)  # [n]
    which = torch.searchsorted(ends, positions, right=True)  # [b]: the mini-batch of each row
    return [torch.nonzero(which == i).flatten() for i in range(n)]


def update(policy, optimizer, rollouts, advantages, ref_logp=None, *, temperature=1.0, micro_batch_tokens=32768,
           minibatches=1, epochs=1, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=0.01,
           aggregation="seq-mean-token-mean", max_grad_norm=1.0, reduce=Reduce()):
    """GRPO on one rollout batch: `epochs` passes of `minibatches` optimizer steps -> the metrics of
    `policy_loss` averaged over the steps (maxima: the max), grad_norm (before the clip), n_steps.
    advantages [B]; ref_logp [B, T] under the KL term's reference (`rollout_logprobs`) or None.
    The old log-probs are taken once, before the first step (with one step, the training forward's
    own: ρ = 1 exactly). Mini-batches are consecutive slices of the batch (whole groups when
    B / minibatches is a multiple of G); inside one, micro-batches of up to `micro_batch_tokens`
    padded tokens add up to the mini-batch's gradient (21); then the norm is clipped and AdamW
    steps (22). reduce: how counts, gradients and metrics add up over processes (`Reduce`).
    """
    device = policy.device
    n_rows = int(reduce.total(torch.tensor(len(rollouts))))  # the whole batch's
    minibatches = min(minibatches, n_rows)  # a batch of few kept questions cannot fill more
    on_policy = epochs * minibatches == 1  # the policy has not moved when the loss is taken
    old_logp = None if on_policy else rollout_logprobs(policy, rollouts, micro_batch_tokens, temperature, reduce)
    ref_logp = None if kl_coef == 0 else ref_logp
    prompt_lengths, lengths = row_lengths(rollouts)
    history = []
    policy.train()  # HF applies activation checkpointing in train mode only; Qwen has no dropout
    for _ in range(epochs):
        for minibatch in split_minibatches(reduce.positions(len(rollouts)), n_rows, minibatches):
            totals = dict(batch_totals(rollouts.mask[minibatch], combine=reduce.total),
                          max_len=rollouts.max_new_tokens)  # Dr.GRPO's constant, not this batch's longest
            step = {}
            micro_batches = token_batches(minibatch, prompt_lengths, lengths, micro_batch_tokens)
            padding = reduce.extra_passes(policy, len(micro_batches))  # (a collective: before the passes)
            for rows in micro_batches:
                logp, mask = rows_logprobs(policy, rollouts, rows, temperature)
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
                logp, _ = rows_logprobs(policy, rollouts, PADDING_ROWS, temperature)
                (0 * logp.sum()).backward()
            reduce.sum_gradients(policy.parameters())  # then every process clips the same, global, norm
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(dict(reduce.sum_metrics(step), grad_norm=float(grad_norm)))
    policy.eval()
    summary = {k: (max if k.endswith("_max") else lambda v: sum(v) / len(v))([h[k] for h in history])
               for k in history[0]}
    return dict(summary, n_steps=len(history))


def make_optimizer(model, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01):
    """AdamW as in the paper (METHOD.md, eq. 22), constant learning rate, over the trainable
    weights; on CUDA the fused kernel (one pass over weights, gradients and both moments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=params[0].device.type == "cuda")
