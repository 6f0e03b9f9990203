"""The vision tower's attention in one call per layer instead of one per window.

Qwen2.5-VL's vision tower cuts each image into windows of 8 × 8 patches (112 pixels a side) and
lets a patch attend only within its window, except in four full-attention layers where it attends
to its whole image. The patches of every image of a batch travel as one packed sequence, and
`cu_seqlens` marks where each window (or image) starts.

HF's plain `sdpa` path splits that sequence and calls attention once per window: a 448 × 448 image
has 16 windows, so every windowed layer makes 16 calls per image, and the host waits on the GPU
once per layer to read the window lengths. One forward pass of the 3B model's vision tower on one
image dispatches ~18,000 operations, more than the 36-layer language model over 8 rows; in a GRPO
step that host work, not the GPU's, set the pace (BENCHMARKS.md).

Here the windows are laid side by side instead, [windows, heads, longest window, head_dim], padded
where a window is shorter (masked out as keys, dropped as queries), and go through one
`scaled_dot_product_attention` call. HF hands the packed sequence and its boundaries to an
attention implementation only when its name contains "flash" (its test for varlen kernels), hence
the name under which this one is registered; it is plain PyTorch and runs anywhere.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "windowed_sdpa_flash_varlen"


def windowed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                       cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query, key, value: [1, heads, S, d], S patches in windows laid end to end; cu_seq_lens_q:
    [W + 1] window boundaries; max_length_q: the longest window (an int). Each patch attends to
    the patches of its own window. Returns ([1, S, heads, d], None), as HF's implementations do."""
    _, heads, S, d = query.shape
    starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]  # [W]
    W, longest = len(lengths), int(max_length_q if max_length_q is not None else lengths.max())
    offsets = torch.arange(longest, device=query.device)
    real = offsets < lengths[:, None]  # [W, longest]: False on padding
    gather = (starts[:, None] + offsets).clamp(max=S - 1)  # padding reads any real patch; it is masked

    def windows(x):  # [1, heads, S, d] -> [W, heads, longest, d]
        return x[0][:, gather].transpose(0, 1)
    mask = None if S == W * longest else real[:, None, None, :]  # equal windows need no mask
    out = F.scaled_dot_product_attention(windows(query), windows(key), windows(value), attn_mask=mask,
                                         dropout_p=dropout, scale=scaling)  # [W, heads, longest, d]
    # Back to the packed order: patch p is row p - starts[w] of its window w.
    patch = torch.arange(S, device=query.device)
    window = torch.searchsorted(cu_seq_lens_q[1:], patch, right=True)
    row = window * longest + patch - starts[window]
    return out.transpose(1, 2).reshape(W * longest, heads, d)[row][None], None


AttentionInterface.register(NAME, windowed_attention)


def use_windowed_attention(model):
    """Switches `model`'s vision tower to windowed_attention (the language model is unchanged)."""
    model.config.vision_config._attn_implementation = NAME
