import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_images(seed, sizes=((64, 64), (100, 50), (30, 90))):
    """RGB noise images of the given (height, width) sizes."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def completions(tok, texts):
    """Right-padded ids of each text followed by <|im_end|>, and their mask: [B, T] each."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return ids, mask


PROMPTS = ["What is this?", "How many red circles are in the picture? Think step by step.", "hi"]


@pytest.fixture
def tiny():
    """A fresh tiny model (tests may change its generation config), tokenizer, image processor."""
    from model import load_vlm

    return load_vlm("tiny", seed=0)
