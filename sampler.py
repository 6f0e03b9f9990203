"""The hand-written sampler: prefill once, copy the KV cache into n rows, decode token by token.

Both roles sample G completions per prompt (METHOD.md, equation (13); also the Reasoner's m votes
per question, equation (2)). The prompt, image included, is the same for all G, so it is run
through the model once per prompt (the vision encoder sees each image once) and its KV cache is
repeated into the G sample rows. From there each row decodes on its own:

    logits -> suppress vision ids and rows past the tokenizer -> / temperature
           -> log-prob of the drawn token (untruncated distribution)
           -> top-k, top-p truncation -> draw by inverse CDF with the row's own uniform u
              (or argmax at temperature 0)

Log-probs are those of the temperature-scaled distribution *before* top-k / top-p truncation, the
distribution `model.completion_logprobs` scores (as in verl, the truncation is treated as part of
the environment, not of the policy). GRPO does not reuse them as its old log-probs: it recomputes
those with the training forward, as these come from other kernels (on a GPU, the bf16 decode step).

Random numbers: one stream per prompt. A run's samples must not depend on how its prompts were cut
into sampler calls (`sample_in_batches`' KV-cache budget) or shared out among processes (world
size), so nothing is drawn from a generator that the calls consume in turn. Instead the caller gives
each prompt a key (`prompt_keys(seed, *ids, n)`: a hash of the run's seed, of ids naming the call
site such as phase and step, and of the prompt's index in the whole batch), and the uniform of
sample j of that prompt at decode step t is a pure function of (key, j, t), computed by a
counter-based hash (`uniforms`): splitmix64's mixer in int64 tensor ops. So a prompt draws the same
numbers whichever call, batch position or process it lands in, and its n samples, each with its own
j, draw independent numbers from the first token on. The token is then the first whose cumulative probability,
in the truncated and renormalised distribution, exceeds u: the same distribution as before, other
random numbers. Whether the tokens are then identical also needs the logits to be: they are up to
float rounding, which batch shapes can change (a token flips only when u falls within that rounding
of a boundary between two tokens).

Rows stop on <|im_end|> or <|endoftext|> (the model's generation_config); a stopped row emits pad
from then on, and its mask is 1 up to and including the stop token. Pad and stop can be the same
id, so the mask is returned explicitly and never inferred from the ids.

Two interchangeable decoders do the model's part: `CacheDecoder` here, the readable reference (HF's
own forward with a DynamicCache, a host check for finished rows each step), and
`fast_decode.StaticDecoder`, a static cache and a plain-PyTorch decode step replayed as a CUDA graph
(the default on a GPU). The loop below, the sampling and the log-probs are shared.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from machinery.fast_decode import StaticDecoder
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


# Random numbers: splitmix64 (Steele, Lea and Flood 2014, with Vigna's constants) on int64 tensors.
# Its output number c (0, 1, ...) from seed h is mix64(h + (c + 1) * GOLDEN); mix64 is a bijection
# of 64-bit words whose every output bit depends on every input bit. Torch's int64 products and sums
# wrap around modulo 2^64, as the algorithm needs; its >> copies the sign bit, so a mask makes it the
# logical shift the algorithm means. The constants are written as the int64 of their bits.
def _int64(x):
    """A Python int -> the int64 with the same low 64 bits."""
    return (int(x) + 2**63) % 2**64 - 2**63


GOLDEN, MIX1, MIX2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
KEY_BITS = (1 << 63) - 1  # keys are kept non-negative: 63 bits


def shift_right(x, s):
    """Logical right shift of an int64 tensor by s (1..63): torch's >> is arithmetic, so mask the sign copies."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x):
    """splitmix64's mixer: int64 tensor [...] -> [...], a bijection of 64-bit words."""
    x = (x ^ shift_right(x, 30)) * MIX1
    x = (x ^ shift_right(x, 27)) * MIX2
    return x ^ shift_right(x, 31)


def fold(h, c):
    """Output number c of the splitmix64 stream seeded h: int64 tensors h, c (broadcast) -> int64."""
    return mix64(h + (c + 1) * GOLDEN)


def prompt_keys(seed, *ids, n):
    """The keys of prompts 0..n-1 of one sampling site: LongTensor [n] of 63-bit keys.

    seed: the run's seed; ids: ints or strings naming the site (e.g. phase, iteration, step), so that
    each site draws its own numbers. The seed is folded with each id in turn, then with the prompt's
    index: key i = fold(fold(fold(seed, id1), id2)..., i) & KEY_BITS. Key i does not depend on n, so
    a process holding prompts a..b of a batch uses prompt_keys(seed, *ids, n=B)[a:b].
    Strings enter as the first 8 bytes of their BLAKE2b digest (stable across processes, unlike hash()).
    """
    h = torch.tensor(_int64(seed))
    for i in ids:
        i = int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") if isinstance(i, str) else i
        h = fold(h, torch.tensor(_int64(i)))
    return fold(h, torch.arange(n)) & KEY_BITS


def uniforms(keys, n, steps):
    """keys [B] (int64) -> u [B * n, steps] float64 in [0, 1).

    u[b * n + j, t] is the uniform of sample j of prompt b at decode step t: the top 53 bits of
    fold(fold(keys[b], j), t), a pure function of (keys[b], j, t) whatever else is in the call.
    """
    j = torch.arange(n, device=keys.device)
    streams = fold(keys[:, None], j).flatten()  # [B * n]: each sample's own seed
    words = fold(streams[:, None], torch.arange(steps, device=keys.device))  # [B * n, steps]
    return shift_right(words, 11).double() * 2.0**-53


def keep_top_k(logits, top_k):
    """logits [N, V] -> the same with -inf below each row's k-th largest logit (0 = keep all; ties
    with the k-th are kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def nucleus(logits, top_p):
    """top-p in sorted order: logits [N, V] -> order [N, V] (token ids, most probable first), probs
    [N, V] and their cumulative sums in that order, kept [N, 1] (long).

    top-p keeps the smallest set of most probable tokens whose probability adds up to at least top_p:
    a token is kept when the mass of the tokens ranked above it is below top_p, so the most probable
    token is always kept and the kept tokens are the first `kept` of `order`.
    Example: probs [0.5, 0.3, 0.15, 0.05], top_p 0.8 -> mass above each: [0, 0.5, 0.8, 0.95]
    -> keeps the first two (0.8 is not below 0.8).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cumulative = torch.cumsum(probs, dim=-1)
    kept = (cumulative - probs < top_p).sum(-1, keepdim=True)
    return order, probs, cumulative, kept


def truncate_logits(logits, top_k=0, top_p=1.0):
    """logits [N, V] -> the same with -inf outside each row's kept set (top-k, then top-p; see
    keep_top_k and nucleus). The sampler draws from this set without building it (`pick`)."""
    logits = keep_top_k(logits, top_k)
    if top_p < 1.0:
        order, _, _, kept = nucleus(logits, top_p)
        drop_sorted = torch.arange(logits.shape[-1], device=logits.device) >= kept
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def pick(logits, top_k, top_p, u):
    """Inverse-CDF sampling: logits [N, V], u [N] in [0, 1) -> token [N], the first token whose
    cumulative probability in the truncated distribution exceeds u times the kept mass (which
    renormalises it). Distributed as a multinomial draw from softmax(truncate_logits(...)).

    With top-p the cumulative sums are those of nucleus's sort (no second sort). Without it they
    run over the vocabulary in id order: inverse-CDF sampling is valid in any fixed order of the
    tokens, and this one needs no sort (top-k's cut is then its -inf logits, probability 0).
    """
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
def sample(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, keys=None,
           decoder="auto"):
    """Draws n completions for each prompt of `prompts` (a model.PromptBatch on the model's device).

    Returns Samples with ids, mask and logprobs of shape [B * n, T], T <= max_new_tokens (the loop
    ends early once every row has stopped).
    keys: LongTensor [B], one key per prompt (`prompt_keys`), needed unless temperature is 0. A
    prompt's samples depend on its key (and the model), not on the other prompts of the call.
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
    u = None
    if temperature > 0:
        if keys is None or keys.shape != (len(prompts),) or keys.dtype != torch.long:
            raise ValueError(f"sampling needs keys: a LongTensor [{len(prompts)}], one per prompt "
                             "(sampler.prompt_keys)")
        u = uniforms(keys.to(model.device), n, max_new_tokens)  # [N, max_new_tokens]: step t uses column t

    ids, logps, masks = [], [], []
    finished = torch.zeros(N, dtype=torch.bool, device=model.device)
    for t in range(max_new_tokens):
        logits = next_token_logits(hidden, source.head_weight, suppressed, temperature)
        token, logp = draw(logits, temperature, top_k, top_p, None if u is None else u[:, t])
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


def sample_in_batches(model, prompts, max_tokens, n=1, *, max_new_tokens, keys=None, **settings):
    """`sample` over as many prompts at a time as fit in a KV cache of `max_tokens` tokens (n rows
    per prompt, each as long as the call's longest prompt plus max_new_tokens; `model.token_batches`,
    longest prompts first, at least one prompt a call). Results come back in prompt order, padded to
    the longest. What must fit in memory is one call's cache, whatever the images' sizes.
    keys: [B], as for `sample`; each call gets its prompts' keys, so the samples are those of one
    call over all the prompts, whatever the budget (up to float rounding of the logits)."""
    prompt_lengths = prompts.attention_mask.sum(1).cpu()
    batches = token_batches(torch.arange(len(prompts)), prompt_lengths, torch.full_like(prompt_lengths, max_new_tokens),
                            max_tokens // n)
    parts = [sample(model, prompts.select(b.tolist()), n=n, max_new_tokens=max_new_tokens,
                    keys=None if keys is None else keys[b.to(keys.device)], **settings)
             for b in batches]
    T = max(p.ids.shape[1] for p in parts)
    pad_id = model.generation_config.pad_token_id
    # Row j of prompt b is row b * n + j of the result.
    rows = (torch.cat(batches)[:, None] * n + torch.arange(n)).flatten().to(parts[0].ids.device)

    def joined(name, fill):
        values = torch.cat([F.pad(getattr(p, name), (0, T - p.ids.shape[1]), value=fill) for p in parts])
        return torch.empty_like(values).index_copy_(0, rows, values)
    return Samples(joined("ids", pad_id), joined("mask", 0), joined("logprobs", 0.0))
