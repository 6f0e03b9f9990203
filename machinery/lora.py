"""LoRA (Hu et al. 2021), written by hand for the language model of Qwen2.5-VL, so that one self-play
phase of the 3B model fits in 24 GB: the base weights stay frozen (and can be bf16), and only two
small matrices per adapted layer are trained, with their gradients and AdamW state.

An adapted linear layer computes

    y = W x + b + (α / r) · B A x          W [out, in] frozen,  A [r, in],  B [out, r],  r << in, out

(plus the role's earlier updates, if any, as frozen factors: see "Self-play with LoRA" below).

A starts random and small (kaiming-uniform with a = sqrt(5), the bound 1 / sqrt(in) of nn.Linear's
own init, as the paper's code and peft); B starts at zero, so B A = 0 and training starts exactly at
the base model. A and B are float32 even when the base is bf16: they are the master weights that
AdamW updates (see model.autocast); the LoRA path is computed in the input's dtype, or in bf16 under
autocast. Scaling by α / r keeps the size of an update roughly independent of r.

Which layers: by default every attention projection (q, k, v, o) and every MLP projection (gate, up,
down) of every decoder layer of the language model, `model.model.language_model.layers`. The vision
tower and lm_head (tied to the embedding) are frozen and unchanged. A target written
"visual.<name>" (e.g. "visual.qkv") puts adapters on the vision blocks' linears of that name too.

How it plugs into GRPO: the optimizer gets only the parameters `add_lora` returns (every other
parameter has requires_grad False, so `grpo.make_optimizer` already picks exactly these). The
reference log-probs of the KL term come from the same model with its adapters switched off,
`with adapters(model, False): ...`, which is the model at the start of the phase: no second copy
of the weights. Between steps `lora_state_dict` is all a resumable checkpoint needs. The sampler's
fast decode step (fast_decode.py) reads the base weights and the factors as they are, never a
merged copy of the weights.

Self-play with LoRA: every role is the one frozen base plus low-rank updates. A role's update from
each phase it trained stays factored: at the end of a phase, `updates` returns the adapters' whole
update so far (earlier phases and this one, concatenated along the rank), and the role's next
phase starts from the base with those as its frozen `past` factors and a fresh adapter on top. So
the Questioner in training and the frozen Reasoner that rewards it are one set of base weights and
two sets of factors (`shared_copy`): 7 GiB of bf16 weights for the 3B model, not 14. Merging into
the base, as `merge_lora` does for the plain checkpoint each role also gets, would make each role a
different model, and on a bf16 base it would round away, weight by weight, any update below
bf16's resolution (2^-8 of the weight); the factors keep the update itself in float32.

Left out: dropout on the LoRA path (the paper's 0.05-0.1 matters little for short RL runs, and
without it the disabled-adapter reference is exact), quantised base weights (QLoRA), rank-stabilised
or other scalings, per-layer ranks, and adapters on the embedding or lm_head.
"""

import contextlib
import copy
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """A frozen nn.Linear `base`, the frozen updates of the role's earlier phases (`past`), and the
    trainable low-rank update scale · B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.enabled = True
        # Drawn in float32 on the CPU, then moved: the same seed gives the same A on any device.
        A = torch.empty(rank, base.in_features)  # [r, in]
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        device = base.weight.device
        self.lora_A = nn.Parameter(A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))  # [out, r]
        # The earlier updates, scales folded in and concatenated along the rank: past_B @ past_A is
        # their sum [out, in]. Float32 and frozen; rank 0 for a role that starts at the base model.
        self.register_buffer("past_A", torch.zeros(0, base.in_features, device=device), persistent=False)
        self.register_buffer("past_B", torch.zeros(base.out_features, 0, device=device), persistent=False)

    def forward(self, x):  # x [..., in] -> [..., out]
        out = self.base(x)
        # Two thin matmuls per update, [..., in] -> [..., r] -> [..., out]; B A [out, in] is never
        # built. .to(x.dtype) lets a bf16 input meet the float32 factors (gradients still reach A, B).
        if self.past_A.shape[0]:
            out = out + F.linear(F.linear(x, self.past_A.to(x.dtype)), self.past_B.to(x.dtype))
        if not self.enabled:
            return out  # the role at the start of its phase: what the KL reference relies on
        h = F.linear(x, self.lora_A.to(x.dtype))
        return out + self.scale * F.linear(h, self.lora_B.to(x.dtype))

    def factors(self):
        """What the layer adds to the base, as one factored update: (A [R, in], B [out, R]), float32,
        B @ A = the update. The trainable part counts while enabled and once trained (a fresh one,
        B = 0, adds nothing)."""
        if not self.enabled or not self.lora_B.any():
            return self.past_A, self.past_B
        return (torch.cat([self.past_A, self.lora_A.detach()]),
                torch.cat([self.past_B, self.scale * self.lora_B.detach()], dim=1))

    def extra_repr(self):
        return (f"rank={self.lora_A.shape[0]}, past_rank={self.past_A.shape[0]}, scale={self.scale:g}, "
                f"enabled={self.enabled}")


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
    previous state (also on an exception). `with adapters(policy, False):` is the role at the start
    of its phase: the base model plus its earlier updates (`past`), which stay on."""
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
    """Folds each adapted layer's update (`LoRALinear.factors`: the earlier ones, and the trainable
    one while enabled) into its base weight and puts the plain nn.Linear back, in place: the model
    then has exactly the base model's parameter names, for `save_pretrained`. The sum is done in
    float32 (or the base's dtype, if wider) and rounded once to the base dtype: on a bf16 base,
    updates below bf16's resolution (2^-8 of a weight) are lost, so call `model.float()` first to
    keep them (the saved checkpoint is then float32). The base weights change in place: so does any
    `shared_copy` of the model."""
    for parent, name, lora in _children(model, LoRALinear):
        W = lora.base.weight  # [out, in]
        A, B = lora.factors()
        wide = torch.promote_types(W.dtype, torch.float32)
        W.copy_(W.to(wide) + B.to(wide) @ A.to(wide))  # [out, R] @ [R, in]; copy_ rounds to W's dtype
        setattr(parent, name, lora.base)
    return model


def updates(model):
    """The whole low-rank update of each adapted layer (`LoRALinear.factors`), copied to the CPU:
    {"<layer>.past_A": [R, in], "<layer>.past_B": [out, R]}, the form `set_past` takes, so the role's
    next phase starts from it. R grows by r with every phase that trained (~120 MB each for the 3B at
    r = 16)."""
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            A, B = module.factors()
            result[f"{name}.past_A"] = A.to("cpu", torch.float32, copy=True)
            result[f"{name}.past_B"] = B.to("cpu", torch.float32, copy=True)
    return result


@torch.no_grad()
def set_past(model, past):
    """Makes `past` (from `updates`; {} = none, the base model) the frozen earlier updates of the
    model's adapters. The trainable parts are left as they are."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = {f"{name}.past_{x}" for name in modules for x in "AB"}
    if past and past.keys() != expected:
        missing, unexpected = sorted(expected - past.keys()), sorted(past.keys() - expected)
        raise ValueError(f"LoRA updates do not match the model's adapters: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, m in modules.items():
        A = past.get(f"{name}.past_A", m.past_A.new_zeros(0, m.base.in_features))
        B = past.get(f"{name}.past_B", m.past_B.new_zeros(m.base.out_features, 0))
        m.past_A, m.past_B = A.to(m.past_A.device, torch.float32), B.to(m.past_B.device, torch.float32)


def shared_copy(model, past):
    """Another role over the same base: a copy of `model` whose every parameter and buffer is the
    same tensor as `model`'s (a deepcopy with each tensor already in its memo, so only the modules
    are copied), then given `past` as its updates, with its trainable parts, which are `model`'s,
    switched off. It costs the memory of its factors only. For sampling, not training."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo=tensors)
    for m in twin.modules():
        if isinstance(m, LoRALinear):
            m.enabled = False
    set_past(twin, past)
    return twin


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
