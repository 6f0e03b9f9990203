"""The sampler's CPU decode path: sampler.CacheDecoder's numbers, without its two CPU costs.

Why. On CPU a decode step of a small model costs its matmuls, and two things add to them. HF's
DynamicCache appends each token by concatenation, which copies every layer's whole cache each step;
`GrowingLayer` grows its storage in place instead. And a batch's rows stop at different steps (the
shapes Reasoner's guesses stop after about 15 tokens, its checks after about 30; the GRPO groups'
votes likewise), so most rows would decode pad most of the time; `ShrinkingDecoder` drops the
stopped rows from the cache and computes only those still going.

Why the numbers are the reference's. The rows still going run through CacheDecoder's step, HF's
forward, and on CPU a row's numbers do not depend on which rows sit beside it in the batch (the
tests hold the sampler and evaluate.py to it, against CacheDecoder itself). `Prefill` lets two
sampler calls over the same prompts (evaluate.py's greedy answers and its samples) share one
prefill. On a GPU fast_decode.StaticDecoder is used instead: its CUDA graph wants fixed shapes.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from model import prefill
from sampler import CacheDecoder


class GrowingLayer(DynamicLayer):
    """One layer of a KV cache that grows in place. HF's DynamicLayer appends a token by
    concatenation, which copies the layer's whole cache every step (on CPU, a decode step's largest
    cost); this one copies only when its storage is full, into storage twice the size, and hands
    out views of the filled part. A view holds the numbers the concatenation would, in its shape,
    so attention computes exactly the same."""

    def __init__(self, keys, values):  # [rows, heads, length, head_dim] each; taken over, not copied
        super().__init__()
        self.key_store, self.value_store = keys, values
        self.device, self.length, self.is_initialized = keys.device, keys.shape[2], True
        self._views()

    @staticmethod
    def _widened(filled, capacity):
        store = filled.new_empty(*filled.shape[:2], capacity, filled.shape[3])
        store[:, :, :filled.shape[2]] = filled
        return store

    def _views(self):
        self.keys = self.key_store[:, :, :self.length]
        self.values = self.value_store[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if end > self.key_store.shape[2]:
            self.key_store, self.value_store = (self._widened(filled, 2 * end) for filled in (self.keys, self.values))
        self.key_store[:, :, self.length:end] = key_states
        self.value_store[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.key_store, self.value_store = self.key_store[indices], self.value_store[indices]
        self._views()


class Prefill:
    """A batch of prompts run through the model once, for several sampler calls alike (evaluate.py's
    greedy answers and its samples): each layer's keys and values and the hidden state that
    predicts each prompt's first token, computed as sampler.CacheDecoder computes them. `decoder`
    is a decoder for sampler.sample that starts from them."""

    def __init__(self, model, prompts):
        self.model, self.prompts = model, prompts
        cache = DynamicCache(config=model.config)
        self.last_hidden = prefill(model, prompts, cache)[:, -1]
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def decoder(self, model, prompts, n, max_new_tokens):
        """sample(model, prompts, ..., decoder=prefill.decoder), for the prompts of this prefill."""
        if model is not self.model or prompts is not self.prompts:
            raise ValueError("a Prefill decodes the model and prompts it was made from")
        return ShrinkingDecoder(model, prompts, n, prefill=self)


class ShrinkingDecoder(CacheDecoder):
    """sampler.CacheDecoder, its cache grown in place (GrowingLayer), that stops computing the rows
    that have stopped: a stopped row decodes pad, which the sampler discards. Starts from `prefill`
    (a Prefill of these prompts) when given one, else prefills them itself."""

    def __init__(self, model, prompts, n, max_new_tokens=None, prefill=None):  # (the cache grows as it goes)
        prefill = prefill if prefill is not None else Prefill(model, prompts)
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.cache.layers = [GrowingLayer(keys.repeat_interleave(n, dim=0), values.repeat_interleave(n, dim=0))
                             for keys, values in prefill.layers]
        self.first_hidden = prefill.last_hidden.repeat_interleave(n, dim=0)
        self.head_weight = model.lm_head.weight
        self.attention_mask = prefill.prompts.attention_mask.repeat_interleave(n, dim=0)
        self.positions = prefill.prompts.next_position.repeat_interleave(n, dim=0)
        self.stop_ids = torch.tensor(model.generation_config.eos_token_id, device=model.device).flatten()
        self.computed = torch.arange(len(self.first_hidden), device=model.device)  # the rows still in the cache
        self.stopped = torch.zeros(len(self.computed), dtype=torch.bool, device=model.device)  # not yet dropped
        self.hidden = self.first_hidden.clone()  # a dropped row keeps its last (unused) state

    def step(self, tokens):
        tokens = tokens[self.computed]
        self.stopped |= torch.isin(tokens, self.stop_ids)  # as the sampler marks its finished rows
        # Dropping rows copies the cache of the rows kept, about what a step costs: so it waits until
        # a quarter of the computed rows have stopped. (Never all of them: the sampler stops first.)
        if int(self.stopped.sum()) >= len(self.stopped) / 4:
            keep = (~self.stopped).nonzero().flatten()
            self.cache.batch_select_indices(keep)
            self.attention_mask, self.positions = self.attention_mask[keep], self.positions[keep]
            self.computed, self.stopped, tokens = self.computed[keep], self.stopped[keep], tokens[keep]
        self.hidden[self.computed] = super().step(tokens)
        return self.hidden
