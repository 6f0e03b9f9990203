"""The fast decode path of the sampler: a static KV cache and one decode step for text tokens,
written in plain PyTorch over the model's own weights, replayed as a CUDA graph on a GPU.

Why it is fast. A decode step moves one token per row through 36 layers: tiny matmuls whose cost is
reading the weights, plus a few hundred kernel launches that the host issues one by one. Going
through HF's modules adds Python work, a mask rebuilt every step and a cache grown by
concatenation. Here the cache has a fixed shape [rows, kv_heads, max_len, head_dim] per layer,
every tensor of the step has a fixed shape, and the step is captured once in a CUDA graph, so a
step is one graph launch. Rows that already stopped keep decoding pad; the sampler checks for
finished rows every few steps rather than after each one, so nothing waits on the host. Inside
the graph every kernel still costs a few microseconds, so the step is written to need few (about
15 a layer): q, k and v from one matmul, q and k rotated together, attention in one SDPA call, the
residual adds folded into the output matmuls, each RMSNorm one fused kernel. LoRA updates (lora.py)
add two thin matmuls to each adapted projection rather than a merged copy of its weight.

Why it is simple. During decoding every token is text, and text tokens have equal t/h/w
positions, so Qwen2.5-VL's M-RoPE reduces to plain 1-D RoPE at the row's next position
(`PromptBatch.next_position` + steps so far): no vision logic is needed after the prefill, which
still runs through HF's model (`model.prefill`, over the embeddings that hold the image). The step is
the Qwen2 decoder layer: RMSNorm -> q/k/v (with bias) -> RoPE -> grouped-query attention over the
cache -> o_proj -> residual -> RMSNorm -> SiLU-gated MLP -> residual, then the final norm.

On CPU the same step runs without the graph: the tests check it against HF's forward there.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from machinery.cpu_decode import ShrinkingDecoder
from machinery.lora import LoRALinear
from model import PromptBatch, prefill
from sampler import CacheDecoder


@dataclass
class Linear:
    """A projection of the decode step: weight [out, in], bias [out] or None, and a LoRA update kept
    as its two factors, down [r, in] and up [out, r] with the scale folded in (r = 0 without
    adapters), so an adapted weight is never merged into a copy (~5 GB for the 3B model)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    down: torch.Tensor
    up: torch.Tensor

    def __call__(self, x, residual=None):
        """[N, in] -> [N, out]; plus `residual` [N, out], added by the matmul itself."""
        if residual is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = torch.addmm(residual, x, self.weight.T)
            if self.bias is not None:
                y = y + self.bias
        if self.down.shape[0]:
            y = torch.addmm(y, F.linear(x, self.down), self.up.T)
        return y


def as_linear(module, dtype):
    """An nn.Linear, or a lora.LoRALinear with its update as one pair of factors (its earlier
    updates and, while enabled, its adapter), in the compute dtype. Float32 master weights are
    copied to bf16 once per sampling call (reading half the bytes is most of the speed); weights
    already in the dtype are shared, not copied."""
    adapted = isinstance(module, LoRALinear)
    base = module.base if adapted else module
    weight = base.weight.detach().to(dtype)
    bias = None if base.bias is None else base.bias.detach().to(dtype)
    if adapted:
        down, up = (f.to(dtype) for f in module.factors())
    else:
        down, up = weight.new_zeros(0, weight.shape[1]), weight.new_zeros(weight.shape[0], 0)
    return Linear(weight, bias, down, up)


def stacked(modules, dtype):
    """One Linear for several that read the same input (q, k and v), outputs concatenated: one
    matmul instead of three. The adapters' down factors stack too and their up factors go on a
    block diagonal, so each output still sees only its own adapter."""
    parts = [as_linear(m, dtype) for m in modules]
    return Linear(torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts]),
                  torch.cat([p.down for p in parts]), torch.block_diag(*[p.up for p in parts]))


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate: Linear
    up: Linear
    down: Linear


def text_weights(model, dtype):
    """The language model's weights in the compute dtype: (embedding, layers, final norm)."""
    lm = model.model.language_model

    def w(p):
        return p.detach().to(dtype)
    layers = [LayerWeights(w(layer.input_layernorm.weight),
                           stacked([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], dtype),
                           as_linear(layer.self_attn.o_proj, dtype), w(layer.post_attention_layernorm.weight),
                           as_linear(layer.mlp.gate_proj, dtype), as_linear(layer.mlp.up_proj, dtype),
                           as_linear(layer.mlp.down_proj, dtype))
              for layer in lm.layers]
    return w(lm.embed_tokens.weight), layers, w(lm.norm.weight)


def rms_norm(x, weight, eps):
    """Qwen2's RMSNorm in one kernel (fused on a GPU) instead of four: normalised and scaled in
    float32, rounded once to the compute dtype. Qwen2 rounds before it scales; in bf16 the two can
    differ by a rounding step, like the residual adds that the output matmuls fold in."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rope(x, cos, sin_signed):
    """x: [N, heads, head_dim]; cos, sin_signed: [N, 1, head_dim]. HF's rotate-half convention,
    rotate_half(x) = [-x2, x1]: with the sign folded into the first half of sin_signed, the rotation
    is a swap of halves."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin_signed)


def decoder_for(device):
    """The sampler's decoder on `device`: StaticDecoder and its CUDA graph on a GPU; elsewhere
    cpu_decode.ShrinkingDecoder, the reference's numbers without its copies and stopped rows (on
    CPU the static step is no faster)."""
    return StaticDecoder if device.type == "cuda" else ShrinkingDecoder


class StaticDecoder:
    """Prefill through HF, then decode from a static cache: sampler.CacheDecoder's interface. The
    sampler asks whether all rows have stopped every 8 steps, so the GPU never waits on the host
    in between."""
    check_every = 8

    def __init__(self, model, prompts: PromptBatch, n, max_new_tokens, dtype=None, cuda_graph=None):
        """dtype: of the decode step (default: bf16 on CUDA, else the model's); cuda_graph: capture
        the step (default: on CUDA)."""
        config = model.config.text_config
        self.device = model.device
        # bf16 compute on a GPU even over float32 master weights; the model's own dtype elsewhere.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else next(model.parameters()).dtype)
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.embed, self.layers, self.norm = text_weights(model, self.dtype)
        head = model.lm_head.weight  # Qwen2.5-VL-3B ties it to the embedding: one compute copy serves both
        self.head_weight = self.embed if head is model.get_input_embeddings().weight else head.detach().to(self.dtype)
        theta = config.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, device=self.device).float() / self.head_dim))

        # Prefill once per prompt through HF's text model, then copy the cache into n rows each.
        cache = DynamicCache(config=model.config)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
            last = prefill(model, prompts, cache)[:, -1]
        # (float32 after float32 weights: autocast leaves the residual stream alone)
        self.first_hidden = last.to(self.dtype).repeat_interleave(n, dim=0)
        N, L = len(prompts) * n, prompts.input_ids.shape[1]
        # Cache slots past the last token are masked; a multiple of 16 suits the attention kernels.
        self.prompt_len, self.max_len = L, -(-(L + max_new_tokens) // 16) * 16
        shape = (N, self.n_kv, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for i, layer in enumerate(cache.layers):
            self.k[i][:, :, :L] = layer.keys.repeat_interleave(n, dim=0)
            self.v[i][:, :, :L] = layer.values.repeat_interleave(n, dim=0)
        self.prompt_keys = torch.zeros(N, self.max_len, dtype=torch.bool, device=self.device)
        self.prompt_keys[:, :L] = prompts.attention_mask.bool().repeat_interleave(n, dim=0)
        self.slots = torch.arange(self.max_len, device=self.device)

        # The step's inputs live in fixed buffers, so the captured graph can be replayed on new values.
        self.tokens = torch.zeros(N, dtype=torch.long, device=self.device)
        self.positions = prompts.next_position.repeat_interleave(n).to(self.device).clone()
        self.index = torch.zeros(1, dtype=torch.long, device=self.device)  # generated tokens in the cache
        use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = self._capture() if use_graph else None

    def _forward(self):
        """One token per row, all shapes fixed: tokens, positions, index -> hidden [N, H]."""
        N, heads, kv, d = self.tokens.shape[0], self.n_heads, self.n_kv, self.head_dim
        slot = self.index + self.prompt_len  # [1]: where this token's key and value go
        freqs = self.positions[:, None].float() * self.inv_freq  # [N, d / 2]
        cos = torch.cat([freqs, freqs], -1).cos().to(self.dtype)[:, None]  # [N, 1, d]
        sin_signed = torch.cat([-freqs, freqs], -1).sin().to(self.dtype)[:, None]
        visible = self.prompt_keys | ((self.slots >= self.prompt_len) & (self.slots <= slot))  # [N, max_len]
        visible = visible[:, None, None]  # [N, 1, 1, max_len]: the same for every head and query
        x = self.embed[self.tokens]  # [N, H]
        for w, K, V in zip(self.layers, self.k, self.v):
            h = rms_norm(x, w.ln1, self.eps)
            qkv = w.qkv(h).view(N, heads + 2 * kv, d)
            qk = rope(qkv[:, :heads + kv], cos, sin_signed)  # q and k heads rotate alike
            K.index_copy_(2, slot, qk[:, heads:, None])
            V.index_copy_(2, slot, qkv[:, heads + kv:, None])
            # Grouped-query attention as plain attention: the query heads of a kv head are its
            # "query positions", [N, kv, heads / kv, d], so K and V are never repeated.
            q = qk[:, :heads].reshape(N, kv, heads // kv, d)
            attn = F.scaled_dot_product_attention(q, K, V, attn_mask=visible).reshape(N, heads * d)
            x = w.o(attn, residual=x)
            h = rms_norm(x, w.ln2, self.eps)
            x = w.down(F.silu(w.gate(h)) * w.up(h), residual=x)
        return rms_norm(x, self.norm, self.eps)

    def _capture(self):
        """Records _forward once into a CUDA graph (after warm-up runs on a side stream, as CUDA
        graphs require); the warm-up writes to the cache slot of index 0, which step 0 rewrites."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.hidden_out = self._forward()
        return graph

    def step(self, tokens):
        """Feeds the tokens just drawn ([N]); returns the hidden state that predicts the next ones."""
        self.tokens.copy_(tokens)
        if self.graph is None:
            hidden = self._forward()
        else:
            self.graph.replay()
            hidden = self.hidden_out
        self.index += 1
        self.positions += 1
        return hidden
