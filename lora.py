"""LoRA (Hu et al. 2021), written by hand for the language model of Qwen2.5-VL, so that one self-play
phase of the 3B model fits in 24 GB: the base weights stay frozen (and can be bf16), and only two
small matrices per adapted layer are trained, with their gradients and AdamW state.

An adapted linear layer computes

    y = W x + b + (α / r) · B A x          W [out, in] frozen,  A [r, in],  B [out, r],  r << in, out

A starts random and small (kaiming-uniform with a = sqrt(5), the bound 1 / sqrt(in) of nn.Linear's
own init, as the paper's code and peft); B starts at zero, so B A = 0 and training starts exactly at
the base model. A and B are float32 even when the base is bf16: they are the master weights that
AdamW updates (see grpo.autocast); the LoRA path is computed in the input's dtype, or in bf16 under
autocast. Scaling by α / r keeps the size of an update roughly independent of r.

Which layers: by default every attention projection (q, k, v, o) and every MLP projection (gate, up,
down) of every decoder layer of the language model, `model.model.language_model.layers`. The vision
tower and lm_head (tied to the embedding) are frozen and unchanged. A target written
"visual.<name>" (e.g. "visual.qkv") puts adapters on the vision blocks' linears of that name too.

How it plugs into GRPO: the optimizer gets only the parameters `add_lora` returns (every other
parameter has requires_grad False, so `grpo.make_optimizer` already picks exactly these). The
reference log-probs of the KL term come from the same model with its adapters switched off,
`with adapters(model, False): ...`, which is the model at the start of the phase: no second copy
of the weights. At the end of a phase `merge_lora` folds B A into W, so `save_pretrained` writes a
plain Qwen2.5-VL checkpoint; between steps `lora_state_dict` is all a resumable checkpoint needs.
The sampler's fast decode step (fast_decode.py) reads the base weights and the two factors as they
are, never a merged copy of the weights.

Left out: dropout on the LoRA path (the paper's 0.05-0.1 matters little for short RL runs, and
without it the disabled-adapter reference is exact), quantised base weights (QLoRA), rank-stabilised
or other scalings, per-layer ranks, and adapters on the embedding or lm_head.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base` plus the trainable low-rank update scale · B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.enabled = True
        # Drawn in float32 on the CPU, then moved: the same seed gives the same A on any device.
        A = torch.empty(rank, base.in_features)  # [r, in]
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(A.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # [out, r]

    def forward(self, x):  # x [..., in] -> [..., out]
        out = self.base(x)
        if not self.enabled:
            return out  # exactly the base layer: this is what the KL reference relies on
        # Two thin matmuls, [..., in] -> [..., r] -> [..., out]; B A [out, in] is never built.
        # .to(x.dtype) lets a bf16 input meet the float32 masters (gradients still reach them).
        h = F.linear(x, self.lora_A.to(x.dtype))
        return out + self.scale * F.linear(h, self.lora_B.to(x.dtype))

    def extra_repr(self):
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}, enabled={self.enabled}"


def _children(module, kind):
    """(parent, attribute name, child) for every child of type `kind` anywhere under `module`."""
    return [(parent, name, child) for parent in module.modules()
            for name, child in parent.named_children() if isinstance(child, kind)]


def add_lora(model, rank=16, alpha=32, targets=TARGETS, seed=0):
    """Wraps the target linears of the language model in LoRALinear, in place, and freezes every
    other parameter. Returns the LoRA parameters [A_0, B_0, A_1, B_1, ...] for the optimizer.

    targets: names of linear layers ("q_proj" matches every layer's self_attn.q_proj); a name
    "visual.<name>" matches the vision tower's linears called <name>. A target that matches nothing
    is an error (a typo would otherwise train nothing). The same seed gives the same A matrices.
    """
    if _children(model, LoRALinear):
        raise ValueError("the model already has LoRA adapters")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    towers = {"": model.model.language_model, "visual.": model.model.visual}
    params, used = [], set()
    for prefix, tower in towers.items():
        names = {t[len(prefix):]: t for t in targets if t.startswith("visual.") == (prefix == "visual.")}
        for parent, name, linear in _children(tower, nn.Linear):
            if name in names:
                lora = LoRALinear(linear, rank, alpha, generator)
                setattr(parent, name, lora)
                params += [lora.lora_A, lora.lora_B]
                used.add(names[name])
    if set(targets) - used:
        raise ValueError(f"LoRA targets matched no linear layer: {sorted(set(targets) - used)}")
    return params


@contextlib.contextmanager
def adapters(model, enabled: bool):
    """Switches every adapter of `model` on or off inside the block, then restores each one's
    previous state (also on an exception). `with adapters(policy, False):` is the base model."""
    modules = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = enabled
    try:
        yield model
    finally:
        for m, state in zip(modules, before):
            m.enabled = state


@torch.no_grad()
def merge_lora(model):
    """Folds scale · B A into each base weight and puts the plain nn.Linear back, in place: the model
    then has exactly the base model's parameter names, for `save_pretrained`. Merges every adapter,
    enabled or not. The sum is done in float32 and rounded once to the base dtype: on a bf16 base,
    updates below bf16's resolution (2^-8 of a weight) are lost, so call `model.float()` first to
    keep them (the saved checkpoint is then float32)."""
    for parent, name, lora in _children(model, LoRALinear):
        W = lora.base.weight  # [out, in]
        delta = lora.scale * (lora.lora_B.float() @ lora.lora_A.float())  # [out, r] @ [r, in]
        W.copy_((W.float() + delta).to(W.dtype))
        setattr(parent, name, lora.base)
    return model


def lora_state_dict(model):
    """Just the adapter weights, {"...q_proj.lora_A": [r, in], "...q_proj.lora_B": [out, r], ...},
    copied to the CPU (a snapshot: training on does not change it). ~120 MB for the 3B at r = 16."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            if k.endswith(LORA_SUFFIXES)}


def load_lora_state_dict(model, state):
    """Copies adapter weights saved by `lora_state_dict` into a model with the same adapters."""
    own = {k: p for k, p in model.named_parameters() if k.endswith(LORA_SUFFIXES)}
    if own.keys() != state.keys():
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        raise ValueError(f"LoRA weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def count_parameters(model):
    """(trainable, total) numbers of parameters; tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
