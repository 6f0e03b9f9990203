"""The hand-written sampler: prefill once, copy the KV cache into n rows, decode token by token.

Both roles sample G completions per prompt (spec: "GRPO (as used)", rollouts; the Reasoner's m
votes per question). The prompt, image included, is the same for all G, so it is run through the
model once per prompt (the vision encoder sees each image once) and its KV cache is repeated into
the G sample rows. From there each row decodes on its own:

    logits -> suppress vision ids and rows past the tokenizer -> / temperature
           -> log-prob of the drawn token (untruncated distribution)
           -> top-k, top-p truncation -> draw (seeded torch.Generator) or argmax (temperature 0)

Log-probs are those of the temperature-scaled distribution *before* top-k / top-p truncation, the
distribution `model.completion_logprobs` scores (as in verl, the truncation is treated as part of
the environment, not of the policy). GRPO does not reuse them as its old log-probs: it recomputes
those with the training forward, as these come from other kernels (on a GPU, the bf16 decode step).

Rows stop on <|im_end|> or <|endoftext|> (the model's generation_config); a stopped row emits pad
from then on, and its mask is 1 up to and including the stop token. Pad and stop can be the same
id, so the mask is returned explicitly and never inferred from the ids.

Two interchangeable decoders do the model's part: `CacheDecoder` here, the readable reference (HF's
own forward with a DynamicCache, a host check for finished rows each step), and
`fast_decode.StaticDecoder`, a static cache and a plain-PyTorch decode step replayed as a CUDA graph
(the default on a GPU). The loop below, the sampling and the log-probs are shared.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from fast_decode import StaticDecoder
from model import next_token_logits, prompt_embeddings, suppressed_mask, token_batches


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


def truncate_logits(logits, top_k=0, top_p=1.0):
    """logits [N, V] -> the same with -inf outside each row's kept set.

    top-k keeps the k largest logits (0 = all). top-p keeps the smallest set of most probable
    tokens whose probability adds up to at least top_p: a token is kept when the mass of the tokens
    ranked above it is below top_p, so the most probable token is always kept.
    Example: probs [0.5, 0.3, 0.15, 0.05], top_p 0.8 -> mass above each: [0, 0.5, 0.8, 0.95]
    -> keeps the first two (0.8 is not below 0.8).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_above >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(logits, temperature, top_k, top_p, generator):
    """logits [N, V] (already scaled, suppressed at -inf) -> token [N], its log-prob [N]."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(truncate_logits(logits, top_k, top_p), dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


class CacheDecoder:
    """The reference decode path: HF's own forward over a DynamicCache that grows a token per step.

    Use: `hidden = d.first_hidden`, then `hidden = d.step(tokens)` once per generated token
    (tokens: [N], the ones just drawn; hidden: [N, H], predicting the next ones).
    fast_decode.StaticDecoder has the same interface.
    """

    def __init__(self, model, prompts, n):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        out = model.model(inputs_embeds=prompt_embeddings(model, prompts), attention_mask=prompts.attention_mask,
                          position_ids=prompts.position_ids, cache=self.cache, use_cache=True)
        self.cache.batch_repeat_interleave(n)  # the prompt's keys and values, copied into its n rows
        self.first_hidden = out.last_hidden_state[:, -1].repeat_interleave(n, dim=0)
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
def sample(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, generator=None,
           decoder="auto"):
    """Draws n completions for each prompt of `prompts` (a model.PromptBatch on the model's device).

    Returns Samples with ids, mask and logprobs of shape [B * n, T], T <= max_new_tokens (the loop
    ends early once every row has stopped). Same generator state -> same samples.
    decoder: "hf" (CacheDecoder, the reference), "static" (fast_decode.StaticDecoder, a CUDA graph
    on a GPU), or "auto": static on CUDA, hf elsewhere. The static path checks for finished rows
    every 8 steps, so the GPU never waits for the host in between.
    """
    gen_config = model.generation_config
    stop_ids = torch.tensor(gen_config.eos_token_id, device=model.device).flatten()
    pad_id = gen_config.pad_token_id
    suppressed = suppressed_mask(model)
    static = decoder == "static" or (decoder == "auto" and model.device.type == "cuda")
    source = StaticDecoder(model, prompts, n, max_new_tokens) if static else CacheDecoder(model, prompts, n)
    check_every = 8 if static else 1
    hidden = source.first_hidden
    N = hidden.shape[0]

    ids, logps, masks = [], [], []
    finished = torch.zeros(N, dtype=torch.bool, device=model.device)
    for t in range(max_new_tokens):
        logits = next_token_logits(hidden, source.head_weight, suppressed, temperature)
        token, logp = draw(logits, temperature, top_k, top_p, generator)
        ids.append(token.masked_fill(finished, pad_id))
        logps.append(logp.masked_fill(finished, 0.0))
        masks.append(~finished)
        finished = finished | torch.isin(token, stop_ids)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(finished.all())):
            break
        hidden = source.step(ids[-1])
    mask = torch.stack(masks, 1).long()
    T = int(mask.sum(1).max())  # drop the all-pad steps taken between two checks
    return Samples(torch.stack(ids, 1)[:, :T], mask[:, :T], torch.stack(logps, 1)[:, :T])


def sample_in_batches(model, prompts, max_tokens, n=1, *, max_new_tokens, **settings):
    """`sample` over as many prompts at a time as fit in a KV cache of `max_tokens` tokens (n rows
    per prompt, each as long as the call's longest prompt plus max_new_tokens; `model.token_batches`,
    longest prompts first, at least one prompt a call). Results come back in prompt order, padded to
    the longest. What must fit in memory is one call's cache, whatever the images' sizes.
    Reproducible for a generator state, though not the same draws as one call over all the prompts
    (the generator is consumed call after call); greedy results are the same."""
    prompt_lengths = prompts.attention_mask.sum(1).cpu()
    batches = token_batches(torch.arange(len(prompts)), prompt_lengths, torch.full_like(prompt_lengths, max_new_tokens),
                            max_tokens // n)
    parts = [sample(model, prompts.select(b.tolist()), n=n, max_new_tokens=max_new_tokens, **settings)
             for b in batches]
    T = max(p.ids.shape[1] for p in parts)
    pad_id = model.generation_config.pad_token_id
    # Row j of prompt b is row b * n + j of the result.
    rows = (torch.cat(batches)[:, None] * n + torch.arange(n)).flatten().to(parts[0].ids.device)

    def joined(name, fill):
        values = torch.cat([F.pad(getattr(p, name), (0, T - p.ids.shape[1]), value=fill) for p in parts])
        return torch.empty_like(values).index_copy_(0, rows, values)
    return Samples(joined("ids", pad_id), joined("mask", 0), joined("logprobs", 0.0))
