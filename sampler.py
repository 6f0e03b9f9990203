"""The hand-written sampler: prefill once, copy the KV cache into n rows, decode token by token.

Both roles sample G completions per prompt (METHOD.md, (13); the Reasoner's m votes, (2)). The
prompt, image included, is the same for all G, so it runs through the model once (the vision
encoder sees each image once) and its KV cache is repeated into the G rows. Then each row decodes
on its own: logits -> suppress vision ids -> / temperature -> log-prob of the drawn token (in the
untruncated distribution) -> top-k, top-p -> draw by inverse CDF with the row's own uniform u (or
argmax at temperature 0).

The log-probs are those of the distribution before top-k / top-p, the one
`model.completion_logprobs` scores (as in verl, truncation is part of the environment, not of the
policy). GRPO recomputes its old log-probs with the training forward all the same: these come from
other kernels (on a GPU, the bf16 decode step). Rows stop on the model's eos ids and emit pad from
then on; the mask, 1 up to and including the stop token, is returned, never inferred from the ids.

Random numbers: each prompt comes with a key, and `keys.uniforms(n, steps)` makes sample j's uniform
at step t a pure function of (key, j, t), so a prompt draws the same numbers whichever call or
process it lands in (machinery/keys.py). The decoder runs the model: `CacheDecoder`, the readable
reference over HF's forward, or any class with its interface (machinery/fast_decode.py's
StaticDecoder: a static cache and a decode step replayed as a CUDA graph).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from model import next_token_logits, prefill, suppressed_mask, token_batches


@dataclass
class SamplingSettings:
    """How a role samples: pass as `sample(..., **vars(settings))`."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class Samples:
    """ids, mask, logprobs: [B * n, T]; row b * n + j is sample j of prompt b."""
    ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor

    def texts(self, tokenizer):
        """The text of each row, special tokens (the stop token, pad) left out."""
        return tokenizer.batch_decode(self.ids.masked_fill(self.mask == 0, tokenizer.pad_token_id),
                                      skip_special_tokens=True)


def keep_top_k(logits, top_k):
    """logits [N, V] -> the same with -inf below each row's k-th largest logit (0 = keep all; ties
    with the k-th are kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def nucleus(logits, top_p):
    """top-p: logits [N, V] -> order [N, V] (token ids, most probable first), probs [N, V] and their
    cumulative sums in that order, kept [N, 1]: the first `kept` of `order`, the fewest most probable
    tokens whose mass reaches top_p (a token is kept when the mass ranked above it is below top_p).
    Example: probs [0.5, 0.3, 0.15, 0.05], top_p 0.8 -> mass above [0, 0.5, 0.8, 0.95] -> two kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)
    kept = (cumulative - probs < top_p).sum(-1, keepdim=True)
    return order, probs, cumulative, kept


def pick(logits, top_k, top_p, u):
    """Inverse-CDF sampling: logits [N, V], u [N] in [0, 1) -> token [N], the first whose cumulative
    probability in the truncated distribution exceeds u times the kept mass (which renormalises it):
    a draw from the top-k, top-p distribution. With top-p the sums run in nucleus's sorted order;
    without, in id order (inverse CDF is valid in any fixed order, and that one needs no sort)."""
    logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        order, probs, cumulative, kept = nucleus(logits, top_p)
        fallback = torch.zeros_like(kept)  # position 0: the most probable token
    else:
        order, probs = None, torch.softmax(logits, dim=-1)
        cumulative = torch.cumsum(probs, dim=-1)
        kept = torch.full((len(logits), 1), logits.shape[-1], device=logits.device)  # all of them
        fallback = probs.argmax(-1, keepdim=True)
    total = cumulative.gather(-1, kept - 1)  # [N, 1]: the kept mass
    target = (u[:, None] * total).to(cumulative.dtype)  # [N, 1], in float64 until rounded once
    index = torch.searchsorted(cumulative, target, right=True).clamp_(max=kept - 1)  # [N, 1]
    # A guard against rounding: a GPU's parallel cumsum can step up by an ulp at a token of
    # probability 0 (e.g. a suppressed id); such a token is never returned (the most probable is).
    index = torch.where(probs.gather(-1, index) > 0, index, fallback)
    return (index if order is None else order.gather(-1, index)).squeeze(-1)


def draw(logits, temperature, top_k, top_p, u):
    """logits [N, V] (already scaled, suppressed at -inf), u [N] uniforms (unused at temperature 0)
    -> token [N], its log-prob [N] in the untruncated distribution."""
    logprobs = torch.log_softmax(logits, dim=-1)
    token = logits.argmax(dim=-1) if temperature == 0 else pick(logits, top_k, top_p, u)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


class CacheDecoder:
    """The reference decoder: HF's own forward over a DynamicCache that grows a token per step. Use:
    `hidden = d.first_hidden` ([N, H]), then `hidden = d.step(tokens)` (tokens [N], just drawn) per
    token. check_every: how often `sample` asks whether all rows have stopped (a host sync)."""
    check_every = 1

    def __init__(self, model, prompts, n, max_new_tokens=None):  # (the cache grows as it goes)
        self.model = model
        self.cache = DynamicCache(config=model.config)
        last = prefill(model, prompts, self.cache)[:, -1]
        self.cache.batch_repeat_interleave(n)  # the prompt's keys and values, copied into its n rows
        self.first_hidden = last.repeat_interleave(n, dim=0)
        self.head_weight = model.lm_head.weight
        self.attention_mask = prompts.attention_mask.repeat_interleave(n, dim=0)
        self.positions = prompts.next_position.repeat_interleave(n, dim=0)

    def step(self, tokens):
        # Generated text has equal t/h/w positions, so M-RoPE here is 1-D RoPE at `positions`.
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        out = self.model.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                               position_ids=self.positions[None, :, None].expand(3, -1, 1), cache=self.cache,
                               use_cache=True)
        self.positions = self.positions + 1
        return out.last_hidden_state[:, -1]


@torch.no_grad()
def sample(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, keys=None,
           decoder=CacheDecoder):
    """n completions of each prompt of `prompts` (a model.PromptBatch on the model's device) -> Samples
    [B * n, T], T <= max_new_tokens. keys: a random stream per prompt (machinery.keys.Keys; unused at
    temperature 0), its samples' only randomness; decoder: CacheDecoder, or a class like it."""
    stop_ids = torch.tensor(model.generation_config.eos_token_id, device=model.device).flatten()
    pad_id, suppressed = model.generation_config.pad_token_id, suppressed_mask(model)
    source = decoder(model, prompts, n, max_new_tokens)
    hidden, u = source.first_hidden, None
    if temperature > 0:
        if not hasattr(keys, "uniforms") or len(keys) != len(prompts):
            raise ValueError(f"sampling needs keys, one per prompt ({len(prompts)}): machinery.keys.prompt_keys")
        u = keys.uniforms(n, max_new_tokens, model.device)  # [N, max_new_tokens]: step t uses column t

    ids, logps, masks = [], [], []
    finished = torch.zeros(hidden.shape[0], dtype=torch.bool, device=model.device)
    for t in range(max_new_tokens):
        logits = next_token_logits(hidden, source.head_weight, suppressed, temperature)
        token, logp = draw(logits, temperature, top_k, top_p, None if u is None else u[:, t])
        ids.append(token.masked_fill(finished, pad_id))
        logps.append(logp.masked_fill(finished, 0.0))
        masks.append(~finished)
        finished = finished | torch.isin(token, stop_ids)
        if t == max_new_tokens - 1 or ((t + 1) % source.check_every == 0 and bool(finished.all())):
            break
        hidden = source.step(ids[-1])
    mask = torch.stack(masks, 1).long()
    T = int(mask.sum(1).max())  # drop the all-pad steps taken between two checks
    return Samples(torch.stack(ids, 1)[:, :T], mask[:, :T], torch.stack(logps, 1)[:, :T])


def sample_in_batches(model, prompts, max_tokens, n=1, *, max_new_tokens, keys=None, **settings):
    """`sample` over as many prompts a call as fit in a KV cache of `max_tokens` tokens (n rows of
    prompt + max_new_tokens each; `model.token_batches`), back in prompt order. Each call gets its
    prompts' keys: the samples are one call's, whatever the budget (up to the logits' rounding)."""
    prompt_lengths = prompts.attention_mask.sum(1).cpu()
    batches = token_batches(torch.arange(len(prompts)), prompt_lengths, torch.full_like(prompt_lengths, max_new_tokens),
                            max_tokens // n)
    parts = [sample(model, prompts.select(b.tolist()), n=n, max_new_tokens=max_new_tokens,
                    keys=None if keys is None else keys[b], **settings) for b in batches]
    T = max(p.ids.shape[1] for p in parts)
    pad_id = model.generation_config.pad_token_id
    rows = (torch.cat(batches)[:, None] * n + torch.arange(n)).flatten().to(parts[0].ids.device)  # b * n + j

    def joined(name, fill):
        values = torch.cat([F.pad(getattr(p, name), (0, T - p.ids.shape[1]), value=fill) for p in parts])
        return torch.empty_like(values).index_copy_(0, rows, values)
    return Samples(joined("ids", pad_id), joined("mask", 0), joined("logprobs", 0.0))


@dataclass
class Sampler:
    """A role ready to sample: its model, its Processors (images and texts to prompts), the decoder,
    and the KV-cache tokens of one sampler call (`sample_in_batches`)."""
    model: object
    processors: object
    decoder: type = CacheDecoder
    batch_tokens: int = 393_216

    def __call__(self, images, texts, *, n, settings, keys):
        """n completions of each (image, text) prompt -> (prompts: PromptBatch, Samples, their texts)."""
        prompts = self.processors.encode(images, texts)
        out = sample_in_batches(self.model, prompts.to(self.model.device), self.batch_tokens, n=n, keys=keys,
                                decoder=self.decoder, **vars(settings))
        return prompts, out, out.texts(self.processors.tokenizer)
