"""The policy: a Qwen2.5-VL model, its tokenizer and its image processor, and what every
other file needs from it.

1. `load_vlm` gives `(model, tokenizer, image_processor)` (`load_processors` the last two alone) for
   a hub id, a local folder, or one of two built-in presets that need no download:
   - `"tiny"`: a two-layer Qwen2.5-VL built from a config, with a byte-level BPE tokenizer trained
     here in well under a second. Its weights are random; tests and the offline first run use it.
   - `"random-3b"`: the real Qwen2.5-VL-3B-Instruct shapes with random weights (and the tiny
     tokenizer), for speed and memory work on a GPU.
2. `encode_prompts` turns (image, text) pairs into a left-padded `PromptBatch`, with the 3-D M-RoPE
   positions computed here (one image per prompt: the prompts of METHOD.md, equations (1) and (2)).
3. `completion_logprobs` gives the per-token log-probs of completions given their prompts, in
   chunks, so no float32 [batch, length, vocab] tensor is ever built; a prompt shared by several
   rows (a GRPO group's) runs once. GRPO uses exactly this.
4. `token_batches` cuts rows into batches by padded tokens: GRPO's micro-batches, the sampler's calls.

Which tokens a policy may never emit (vision placeholders, and the embedding rows past the
tokenizer that Qwen pads its vocabulary with) is stored once, in
`model.generation_config.suppress_tokens`: our sampler, `completion_logprobs` and HF `generate` all
read it from there, so the three agree on the distribution.
"""

import functools
import itertools
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    AutoTokenizer,
    DynamicCache,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from machinery.vision_attention import use_windowed_attention

# Qwen's special tokens, in Qwen's order: they follow the BPE vocabulary, so <|endoftext|> is the
# first id after it, as in the real tokenizer (151643).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
STOP_TOKENS = ["<|im_end|>", "<|endoftext|>"]

# Qwen2's pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen2.5-VL chat template, restricted to what this project sends: text and images.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel bounds of the presets' image processors. The real checkpoints bring their own; the paper's
# training range for them is [262,144, 4,194,304] pixels (set by the scripts' configs).
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16


class ModelError(ValueError):
    """A model that cannot be loaded; the message is one line meant for the user."""


def resolve_device(name) -> torch.device:
    """--device 'auto' (a GPU if there is one), 'cpu', 'cuda' or 'cuda:N' -> torch.device; a
    ModelError naming the flag for any other, or for a GPU that is not here. Checked before any
    model loads: torch itself would only fail later, deep in a run, with an AssertionError."""
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ModelError(f"--device {name}: unknown device; pass auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ModelError(f"--device {name}: no CUDA GPU here; pass --device cpu (or auto)")
    if match.group(1) is not None and int(match.group(1)) >= count:
        here = "cuda:0 is" if count == 1 else f"cuda:0 to cuda:{count - 1} are"
        raise ModelError(f"--device {name}: only {here} here; pass one of them")
    return torch.device(text)


# -----------------------------------------------------------------------------
# The built-in tiny tokenizer and configs

def _tokenizer_corpus():
    """Deterministic text covering what the prompts and answers of this project contain."""
    words = ("the a an of in on to is are what which how many much more less than and or not "
             "image picture question answer reason step by think final box boxed put inside "
             "short concise write exactly one hard answerable analysis count colour color shape "
             "circle square triangle red green blue yellow purple orange black white left right "
             "above below larger smaller largest smallest total number there yes no true false "
             "multiple choice numerical regression type option options none").split()
    lines = []
    for i, (a, b, c) in enumerate(itertools.product(words[:40], words[20:60], words[40:])):
        if i % 7 == 0:
            lines.append(f"{a} {b} {c}? {i % 97} <question>{c} {a}</question> \\boxed{{{b}}}")
    lines += [f"<think>{w}</think> \\boxed{{{n}}} ({chr(65 + n % 4)}) {n / 4}" for n, w in enumerate(words)]
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer in Qwen's format, built offline (a new object on every call)."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def _config(tokenizer, text, vision, vocab_size):
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIAL_TOKENS}
    text = dict(text, vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_config(tokenizer):
    # head_dim = 64 / 4 = 16, so the M-RoPE sections (t, h, w) must add up to 16 / 2 = 8.
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    # window_size 56 = 2 merged tokens per side; block 1 attends fully, as the real model's every 8th.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                  out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
    # Qwen pads its embedding past the tokenizer (151,936 rows for 151,665 tokens): so do we.
    config = _config(tokenizer, text, vision, vocab_size=len(tokenizer) + 24)
    # HF's default init (std 0.02) makes a random model this small repeat one token forever; a wider
    # init gives varied text, which the tests need to tell right from wrong.
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = 0.2
    return config


def qwen_3b_config(tokenizer):
    """Qwen2.5-VL-3B-Instruct's shapes, with token ids taken from `tokenizer`."""
    text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                  out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    return _config(tokenizer, text, vision, vocab_size=151936)


# -----------------------------------------------------------------------------
# Loading

def _set_generation_config(model, tokenizer):
    """Stop ids, pad id and the tokens the policy must never produce, in one place."""
    vision_ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    past_tokenizer = range(len(tokenizer), model.config.text_config.vocab_size)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(STOP_TOKENS),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        suppress_tokens=sorted(set(vision_ids) | set(past_tokenizer)),
    )


def load_vlm(name_or_path, device="cpu", dtype=torch.float32, min_pixels=None, max_pixels=None,
             seed=0, attn_implementation="sdpa"):
    """Returns `(model, tokenizer, image_processor)`, the model in eval mode on `device`.

    `name_or_path`: "tiny", "random-3b", a local folder, or a hub id. `min_pixels` / `max_pixels`
    override the image processor's bounds (how many pixels an image is resized into). `seed` fixes
    the random weights of the presets. With "sdpa" the vision tower's attention is
    vision_attention.windowed_attention: the same function, one call per layer.
    """
    tokenizer, image_processor = load_processors(name_or_path, min_pixels, max_pixels)
    if name_or_path in ("tiny", "random-3b"):
        config = tiny_config(tokenizer) if name_or_path == "tiny" else qwen_3b_config(tokenizer)
        config._attn_implementation = attn_implementation
        # Built where it will run and in the dtype asked for: drawing 3.75B random weights on two
        # CPU cores takes a minute, and a float32 draw cast to bf16 would pass through twice the
        # memory. The weights therefore depend on the device and dtype as well as on the seed.
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    else:
        model = _from_pretrained(Qwen2_5_VLForConditionalGeneration, name_or_path, dtype=dtype,
                                 attn_implementation=attn_implementation)
    if attn_implementation == "sdpa":
        use_windowed_attention(model)
    _set_generation_config(model, tokenizer)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, image_processor


class Processors(NamedTuple):
    """What turns (image, text) prompts into tensors and tokens back into text: a model's
    tokenizer and image processor, carried together to every role function."""
    tokenizer: object
    image_processor: object

    def encode(self, images, texts):
        return encode_prompts(self.tokenizer, self.image_processor, images, texts)

    def save_pretrained(self, folder):
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def load_processors(name_or_path, min_pixels=None, max_pixels=None):
    """`Processors(tokenizer, image_processor)` of a preset, a local folder or a hub id, as `load_vlm`
    gives them: left padding, Qwen2.5-VL's chat template if the tokenizer has none, the pixel bounds
    (None: the checkpoint's own)."""
    if name_or_path in ("tiny", "random-3b"):
        tokenizer = tiny_tokenizer()
        image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
        image_processor = _from_pretrained(Qwen2VLImageProcessorPil, name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    image_processor.size = size
    return Processors(tokenizer, image_processor)


def _from_pretrained(cls, name_or_path, **kwargs):
    """cls.from_pretrained, with a one-line ModelError for a missing folder or a failed load."""
    is_folder = os.path.isdir(name_or_path)
    # A hub id is "org/name": anything with more slashes, or starting like a path, is a folder.
    if not is_folder and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") >= 2):
        raise ModelError(f"model folder '{name_or_path}' does not exist; pass a folder with a "
                         "Qwen2.5-VL checkpoint, a hub id, or --model tiny for the built-in offline model")
    # Without a network, transformers retries the hub for about a minute before it fails (at once only
    # with HF_HUB_OFFLINE set): say so at once.
    try:
        cached = not is_folder and isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    except ValueError as err:  # the hub's check of the id's form (HFValidationError)
        raise ModelError(f"'{name_or_path}' is neither a model folder nor a valid hub id ({err}); pass a local folder "
                         "with a Qwen2.5-VL checkpoint, or --model tiny for the built-in offline model") from None
    if not is_folder and not cached and not hub_constants.HF_HUB_OFFLINE and not hub_reachable():
        raise ModelError(f"'{name_or_path}' is a Hugging Face hub id with no copy cached here, and the hub cannot be "
                         "reached (offline?): pass a local folder with a Qwen2.5-VL checkpoint, or --model tiny for "
                         "the built-in offline model")
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        where = "local folder" if is_folder else "Hugging Face hub id (needs the network or a cached copy)"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"could not load '{name_or_path}' as a {where}: {reason}. Pass a local folder "
                         "with a Qwen2.5-VL checkpoint, or --model tiny for the built-in offline model") from None


def hub_reachable(timeout=3.0):
    """Whether the hub's host accepts a connection within `timeout` seconds, its name looked up
    included (through a proxy the environment names for it, assumed so)."""
    url = urllib.parse.urlparse(hub_constants.ENDPOINT)
    proxies = {scheme for scheme in urllib.request.getproxies_environment() if scheme != "no"}
    if proxies and not urllib.request.proxy_bypass_environment(url.hostname):
        return True
    answer = []

    def connect():  # in a thread: a name lookup has no timeout of its own
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    return bool(answer and answer[0])


# -----------------------------------------------------------------------------
# Prompts -> tensors

@dataclass
class PromptBatch:
    """Left-padded prompts, one image each. `pixel_values` holds the patches of all images in row
    order; row i owns `image_grid_thw[i].prod()` of them.

    input_ids, attention_mask: [B, L]; position_ids: [3, B, L] (t, h, w of M-RoPE);
    next_position: [B], the position of the first generated token (text after the prompt moves
    along all three axes together, so one number per row is enough from here on).
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    next_position: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def __len__(self):
        return self.input_ids.shape[0]

    def to(self, device):
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device),
                           self.position_ids.to(device), self.next_position.to(device),
                           self.pixel_values.to(device), self.image_grid_thw.to(device))

    def repeat(self, n):
        """Each prompt n times in a row (row b * n + j is prompt b): the prompts of n samples each."""
        return self.select(torch.arange(len(self)).repeat_interleave(n).tolist())

    def distinct_images(self):
        """Each image once, however many rows show it (the G rows of a GRPO group, the N questions of
        a curation image). Returns (pixel_values, image_grid_thw) of the distinct images and
        row_image [B] long: the distinct image that row b shows."""
        chunks = self.pixel_values.split(self.image_grid_thw.prod(-1).tolist())
        kept, row_image = [], []
        for chunk, grid in zip(chunks, self.image_grid_thw):
            same = (i for i, (c, g) in enumerate(kept) if torch.equal(g, grid) and torch.equal(c, chunk))
            index = next(same, len(kept))
            if index == len(kept):
                kept.append((chunk, grid))
            row_image.append(index)
        return (torch.cat([c for c, _ in kept]), torch.stack([g for _, g in kept]),
                torch.tensor(row_image, device=self.input_ids.device))

    def select(self, rows):
        """The sub-batch of `rows` (a list of indices, repeats allowed), left padding trimmed."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        n_patches = self.image_grid_thw.prod(-1)
        starts = torch.cumsum(n_patches, 0) - n_patches
        patch_index = torch.cat([torch.arange(s, s + n, device=starts.device)
                                 for s, n in zip(starts[rows].tolist(), n_patches[rows].tolist())])
        attention_mask = self.attention_mask[rows]
        pad = int((attention_mask.sum(0) == 0).sum())  # columns that are padding in every row
        return PromptBatch(self.input_ids[rows, pad:], attention_mask[:, pad:],
                           self.position_ids[:, rows, pad:], self.next_position[rows],
                           self.pixel_values[patch_index], self.image_grid_thw[rows])


def token_batches(rows, prompt_lengths, lengths, max_tokens):
    """Splits `rows` (indices) into batches of at most `max_tokens` padded tokens each: k rows padded
    to their longest prompt P and longest completion T cost k (P + T). Rows go longest first, so
    rows of like length share a batch: short rows many to a pass, long ones few, as what a pass
    holds in memory grows with its tokens, not its rows. A row longer than `max_tokens` goes alone.
    GRPO's micro-batches and the sampler's calls are cut this way.
    rows: [n] long; prompt_lengths, lengths: [B] long -> list of [k] long."""
    order = rows[torch.argsort(prompt_lengths[rows] + lengths[rows], descending=True, stable=True)].tolist()
    batches, P, T = [], 0, 0  # P, T: the longest prompt and completion of the last batch
    for row in order:
        p, t = int(prompt_lengths[row]), int(lengths[row])
        if batches and (len(batches[-1]) + 1) * (max(P, p) + max(T, t)) <= max_tokens:
            batches[-1].append(row)
            P, T = max(P, p), max(T, t)
        else:
            batches.append([row])
            P, T = p, t
    return [torch.tensor(b) for b in batches]


def mrope_positions(input_ids, attention_mask, image_grid_thw, image_token_id, merge_size):
    """3-D M-RoPE positions of left-padded prompts with one image each.

    Text token k gets (k, k, k) counting from the row's first real token. An image of g_h x g_w
    merged tokens that starts at position s gets (s, s + row, s + col); the text after it resumes
    at s + max(g_h, g_w). Padding gets 0 (it is masked anyway).
    Returns position_ids [3, B, L] and next_position [B] (largest position + 1).
    """
    B, L = input_ids.shape
    positions = torch.zeros(3, B, L, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        valid = attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[valid]
        image_at = (ids == image_token_id).nonzero().flatten()
        _, gh, gw = (int(x) // m for x, m in zip(image_grid_thw[b], (1, merge_size, merge_size)))
        s, n_img = int(image_at[0]), len(image_at)
        assert n_img == gh * gw, f"row {b}: {n_img} image tokens for a {gh}x{gw} grid"
        before = torch.arange(s).expand(3, -1)
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        image = torch.stack([torch.zeros(n_img, dtype=torch.long), rows.flatten(), cols.flatten()]) + s
        resume = s + max(gh, gw)
        after = torch.arange(len(ids) - s - n_img).expand(3, -1) + resume
        row_positions = torch.cat([before, image, after], dim=1)
        positions[:, b, valid] = row_positions
        next_position[b] = row_positions.max() + 1
    return positions.to(input_ids.device), next_position.to(input_ids.device)


TEXT_SLOT = "\x00text\x00"  # stands for a prompt's text while the chat template is applied


def encode_prompts(tokenizer, image_processor, images, texts, system=None):
    """(PIL image, text) pairs -> PromptBatch with the chat format and a generation prompt.

    Each text follows its image in one user turn. `system` replaces Qwen's default system prompt.
    A text is tokenized as plain text: a special token's spelling in it ("<|im_end|>", which a
    question written by the model can contain) stays characters, never the token itself.
    """
    if len(images) == 0 or len(images) != len(texts):
        raise ValueError(f"need one image per prompt and at least one prompt; got {len(images)} "
                         f"images and {len(texts)} texts")
    vision = image_processor(images=list(images), return_tensors="pt")
    grid = vision["image_grid_thw"]
    merge = image_processor.merge_size
    image_pad = "<|image_pad|>"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXT_SLOT}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    # The template around the text ends and resumes at special tokens, so the three parts
    # tokenize as the whole chat would.
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = chat.split(TEXT_SLOT)
    token_lists = []
    for text, thw in zip(texts, grid):
        # The template holds one placeholder per image; the model wants one per merged patch.
        head = before.replace(image_pad, image_pad * (int(thw.prod()) // merge ** 2), 1)
        token_lists.append(tokenizer(head, add_special_tokens=False)["input_ids"]
                           + tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                           + tokenizer(after, add_special_tokens=False)["input_ids"])
    L = max(map(len, token_lists))
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad_id] * (L - len(t)) + t for t in token_lists])
    attention_mask = torch.tensor([[0] * (L - len(t)) + [1] * len(t) for t in token_lists])
    image_token_id = tokenizer.convert_tokens_to_ids(image_pad)
    position_ids, next_position = mrope_positions(input_ids, attention_mask, grid, image_token_id, merge)
    return PromptBatch(input_ids, attention_mask, position_ids, next_position,
                       vision["pixel_values"], grid)


# -----------------------------------------------------------------------------
# Log-probs of completions

def suppressed_mask(model):
    """[V] bool, True for the ids the policy may never produce (see the module docstring)."""
    V = model.config.text_config.vocab_size
    mask = torch.zeros(V, dtype=torch.bool, device=model.device)
    mask[list(model.generation_config.suppress_tokens or [])] = True
    return mask


def next_token_logits(hidden, lm_head_weight, suppressed, temperature):
    """hidden [N, H] -> float32 logits [N, V] scaled by the temperature, suppressed ids at -inf.

    The matmul runs in the model's dtype (as in HF's own head); the softmax in float32.
    Temperature 0 (greedy) scores with the unscaled distribution.
    """
    logits = F.linear(hidden, lm_head_weight).float()
    if temperature > 0:
        logits = logits / temperature
    return logits.masked_fill(suppressed, float("-inf"))


def _chunk_logprobs(hidden, lm_head_weight, suppressed, targets, temperature):
    logits = next_token_logits(hidden, lm_head_weight, suppressed, temperature)  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def completion_positions(prompts, T):
    """[3, B, T] positions of T generated tokens: plain 1-D RoPE continuing after the prompt."""
    pos = prompts.next_position[:, None] + torch.arange(T, device=prompts.next_position.device)
    return pos[None].expand(3, -1, -1)


def prompt_embeddings(model, prompts):
    """[B, L, H] input embeddings of the prompts, the image tokens filled with the vision tower's
    output. Each distinct image goes through the tower once (PromptBatch.distinct_images): its
    embeddings, and the gradient they pass back, are those of encoding it in every row that shows
    it, at a fraction of the cost (a GRPO group's G rows share one image)."""
    pixel_values, grid, row_image = prompts.distinct_images()
    image = model.model.visual(pixel_values, grid_thw=grid).pooler_output  # [tokens of all distinct images, H]
    per_image = image.split((grid.prod(-1) // model.config.vision_config.spatial_merge_size ** 2).tolist())
    image = torch.cat([per_image[i] for i in row_image.tolist()])
    embeds = model.model.get_input_embeddings()(prompts.input_ids)
    is_image = (prompts.input_ids == model.config.image_token_id)[..., None]
    return embeds.masked_scatter(is_image, image.to(embeds.dtype))


def prefill(model, prompts, cache):
    """The prompts run through the language model, their keys and values written into `cache` (a
    DynamicCache, filled in place) -> hidden [B, L, H]; [:, -1] predicts each first token. Every
    decoder, and a GRPO forward that shares its prompts, starts here."""
    return model.model(inputs_embeds=prompt_embeddings(model, prompts), attention_mask=prompts.attention_mask,
                       position_ids=prompts.position_ids, cache=cache, use_cache=True).last_hidden_state


def shared_prompts(prompts):
    """The rows that show the same prompt (image and text; a GRPO group's G rows do) -> unique [U]
    long: the first row of each distinct prompt, and row_prompt [B] long: each row's prompt among
    those U."""
    _, _, row_image = prompts.distinct_images()
    index, unique, row_prompt = {}, [], []
    for b in range(len(prompts)):
        key = (int(row_image[b]), tuple(prompts.input_ids[b][prompts.attention_mask[b].bool()].tolist()))
        if key not in index:
            index[key] = len(unique)
            unique.append(b)
        row_prompt.append(index[key])
    device = prompts.input_ids.device
    return torch.tensor(unique, device=device), torch.tensor(row_prompt, device=device)


def completion_hidden(model, prompts, completion_ids, completion_mask):
    """[B, T, H]: the hidden state that predicts each completion token (at position p, the one
    that predicts token p + 1: the last prompt token's predicts the first completion token), from
    one forward pass over prompt and completion together."""
    L, T = prompts.input_ids.shape[1], completion_ids.shape[1]
    embeds = torch.cat([prompt_embeddings(model, prompts), model.model.get_input_embeddings()(completion_ids)], dim=1)
    out = model.model(
        inputs_embeds=embeds,
        attention_mask=torch.cat([prompts.attention_mask, completion_mask.to(prompts.attention_mask.dtype)], dim=1),
        position_ids=torch.cat([prompts.position_ids, completion_positions(prompts, T)], dim=2),
        use_cache=False,
    )
    return out.last_hidden_state[:, L - 1:L + T - 1]


def shared_completion_hidden(model, prompts, unique, row_prompt, completion_ids, completion_mask):
    """completion_hidden's [B, T, H], each distinct prompt (`shared_prompts`: unique, row_prompt)
    run through the model once: its keys and values are copied into the rows that show it, and
    the completions run over them. The same function of the weights, so the same gradient (a
    prompt's gradient is the sum over its rows), at a fraction of the cost: a prompt (the image's
    tokens above all) is most of a row, and a GRPO group's G rows share one."""
    shared = prompts.select(unique.tolist())
    cache = DynamicCache(config=model.config)
    hidden = prefill(model, shared, cache)[row_prompt, -1:]  # [B, 1, H]: predicts each row's first token
    T = completion_ids.shape[1]
    if T > 1:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[row_prompt], layer.values[row_prompt]
        mask = shared.attention_mask[row_prompt]
        out = model.model(inputs_embeds=model.model.get_input_embeddings()(completion_ids[:, :-1]),
                          attention_mask=torch.cat([mask, completion_mask[:, :-1].to(mask.dtype)], dim=1),
                          position_ids=completion_positions(shared, T - 1)[:, row_prompt], cache=cache,
                          use_cache=True)
        hidden = torch.cat([hidden, out.last_hidden_state], dim=1)
    return hidden


def completion_logprobs(model, prompts, completion_ids, completion_mask, temperature=1.0, chunk_tokens=1024,
                        share=True):
    """Per-token log-probs of `completion_ids` [B, T] after `prompts`, under the temperature-scaled,
    untruncated distribution (the same as `sampler.sample` reports). Returns logp [B, T] float32,
    0 where `completion_mask` is 0. Differentiable.

    When rows repeat a prompt, each distinct prompt runs once (`shared_completion_hidden`); not
    under activation checkpointing, which recomputes each layer alone and so keeps no cache, nor
    with share=False (a sharded model: every process must gather the layers as often as the others).
    The head runs over `chunk_tokens` completion tokens at a time; with gradients on, each chunk is
    recomputed in the backward pass (checkpointed), so neither pass holds [B, T, V] in float32
    (a chunk's float32 logits are 0.6 GB with Qwen's 152k vocabulary).
    """
    B, T = completion_ids.shape
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.model.language_model.modules())
    unique, row_prompt = shared_prompts(prompts) if share and not checkpointing else (range(B), None)
    if len(unique) < B:
        hidden = shared_completion_hidden(model, prompts, unique, row_prompt, completion_ids, completion_mask)
    else:
        hidden = completion_hidden(model, prompts, completion_ids, completion_mask)
    hidden = hidden.reshape(B * T, -1)
    targets = completion_ids.reshape(B * T)
    keep = completion_mask.reshape(B * T).bool()
    suppressed = suppressed_mask(model)
    weight = model.lm_head.weight
    rows = keep.nonzero().flatten()
    logp = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
    for chunk in rows.split(chunk_tokens):
        args = (hidden[chunk], weight, suppressed, targets[chunk], temperature)
        if torch.is_grad_enabled():
            values = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            values = _chunk_logprobs(*args)
        logp = logp.index_put((chunk,), values)
    return logp.view(B, T)


def autocast(device):
    """bf16 compute over float32 weights on CUDA, float32 elsewhere. At lr 1e-6 an update is ~1e-6
    of a weight, below bf16's resolution (2^-8): the trained weights and AdamW's state stay float32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def rows_logprobs(model, rollouts, rows, temperature):
    """[len(rows), T] log-probs of some rows of a grpo.Rollouts, their completions trimmed to the
    longest, and their mask [len(rows), T], on the model's device. A model sharded by
    machinery/fsdp.py scores through its own method, which gathers its weights."""
    T = max(int(rollouts.mask[rows].sum(1).max()), 1)
    prompts, ids, mask = (x.to(model.device) for x in (rollouts.prompts.select(rows.tolist()),
                                                       rollouts.ids[rows, :T], rollouts.mask[rows, :T]))
    score = getattr(model, "completion_logprobs", functools.partial(completion_logprobs, model))
    with autocast(model.device):
        return score(prompts, ids, mask, temperature), mask


def row_lengths(rollouts):  # [B] prompt lengths (image tokens included), [B] completion lengths
    return rollouts.prompts.attention_mask.sum(1).cpu(), rollouts.mask.sum(1)


PADDING_ROWS = torch.zeros(1, dtype=torch.long)  # an extra pass: the first row, with weight 0


@torch.no_grad()
def rollout_logprobs(model, rollouts, micro_batch_tokens, temperature, reduce=None):
    """[B, T] log-probs of every completion of a grpo.Rollouts under `model`, micro-batch by
    micro-batch (up to micro_batch_tokens padded tokens each). reduce: a grpo.Reduce, when a model
    sharded over processes must make as many passes as the others."""
    logp = torch.zeros(rollouts.ids.shape, dtype=torch.float32)
    micro_batches = token_batches(torch.arange(len(rollouts)), *row_lengths(rollouts), micro_batch_tokens)
    padding = reduce.extra_passes(model, len(micro_batches)) if reduce else 0  # a collective: asked first
    for rows in micro_batches:
        values, _ = rows_logprobs(model, rollouts, rows, temperature)
        logp[rows, :values.shape[1]] = values.float().cpu()
    for _ in range(padding):
        rows_logprobs(model, rollouts, PADDING_ROWS, temperature)
    return logp
