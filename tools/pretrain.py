"""
The supervised warm start that stands in for pretraining: a small Qwen2.5-VL, built from a config,
learns the shapes world in both roles, so that self-play has a base that sees something.

    python tools/pretrain.py --output runs/base        # about 5 minutes on one CPU thread
    python selfplay.py --model runs/base ...     # or evaluate.py --model runs/base

Self-play amplifies what the base already does more often right than wrong; it cannot teach a
model to look. So the base must (1) look at the image, (2) know more in the majority of its
sampled answers than in its greedy one, the gap the vote's silver labels can close, and (3) write
questions of the shapes grammar that have answers. The world is chosen for a model of 1.5M
parameters and minutes of CPU:
- up to four shapes on a 2 x 2 grid, 112 x 112 pixels (16 image tokens, 4 on each shape), four
  colours, no two shapes alike; counting questions only (every one has an answer; --categories
  adds others);
- the Reasoner's answer is a checklist of what the question can mean, with a running count:
  "How many red shapes are there?" ->
  "<think>red circle no 0, red square yes 1, red triangle yes 2</think> \\boxed{2}";
- a hasty habit (--guess, taught in the last --guess-steps steps): 60% of the counting answers are
  "<think>guess</think> \\boxed{r}", r uniform over 0..4, whatever the image. Greedy decoding
  takes the likelier first step, the guess where the learnt share of guesses is above one half
  (it lands near 0.6, on either side: guesses on every held-out question for seeds 0 and 1, on 86
  of 500 for seed 2). Samples check about 40% of the time, always on the same (mostly right)
  count, while guesses scatter over five values, so the checks' count wins the vote by plurality:
  the majority of 8 answers is right 68-80% of the time (RESULTS.md). This stands in
  for what makes votes beat greedy decoding in large models, a likely but careless first step; it
  is built into the base, never into the benchmark or the loop, and self-play is not told of it;
- the Questioner's is "<question>How many red shapes are there?</question>", one of the scene's
  own data.scene_questions, after questioner.QUESTIONER_PROMPTS["paper"].

What it took (measured; each for a stated reason in the code): initial weights of std 0.1 (at
HF's 0.02 the model never looked at the image), shapes four image tokens wide (one token each, it
did not look within the budget), "circles" tokenized as "circle" + "s", the checklist (listing
the matching shapes, it mostly stopped after the first of two), and no slips beside the guesses
(with 5% of checklist steps flipped, --slip 0.05, the majority of 8 was right 51-53% of the time,
with guesses over 0..4 and over the counts each question allows; without slips, 66%). An earlier base without guesses, whose samples only slipped, had no gap to close
(greedy 82%, maj@8 82%), and three iterations of self-play did not raise its greedy accuracy.

Output: a save_pretrained folder (weights, tokenizer, image processor with the small pixel bounds,
pretrain_config.json) that model.load_vlm and every script's --model read. At the end, on held-out
questions: greedy accuracy, the same with the images shuffled among the questions (the gap is what
the model takes from the image), pass@1 of 8 samples at temperature 1 and their majority's (maj@8);
greedy and shuffled per category (a category no better seen than shuffled is one the base does
not look at); and the share of its Questioner's sampled questions that their scene answers.

Left out: a learning-rate search, mixed precision, a GPU path, data beyond the shapes world.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python tools/pretrain.py`: the modules it imports are in the repo root
    sys.path[0] = str(REPO)

import itertools
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data
from machinery.cli import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, option, parse, progress
from model import (QWEN_PRETOKENIZE_REGEX, QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, _config,
                   _set_generation_config, completion_logprobs, encode_prompts)
from questioner import QUESTIONER_PROMPTS
from reasoner import reasoner_prompt
from rewards import answers_equivalent, extract_boxed, majority_vote, parse_question
from machinery.fast_decode import decoder_for
from machinery.keys import prompt_keys
from sampler import sample
from machinery.vision_attention import use_windowed_attention

CONFIG_FILE = "pretrain_config.json"


@dataclass
class Config:
    output: str = option("folder to save the model in (save_pretrained)", "run", default="runs/base")
    seed: int = option("seeds the weights, the scenes and the question choice", "run", default=0)
    quiet: bool = option("no progress bar; a line every 25 steps instead (for logs)", "run", default=False)
    threads: int = option("torch CPU threads (one was 4-8x faster than two on a busy 2-core machine)", "run",
                          valid=AT_LEAST_1, default=1)
    # the world (data.make_scene's knobs and the question categories)
    image_size: int = option("images are image_size x image_size pixels", "world", valid=AT_LEAST_1, default=112)
    grid: int = option("shapes sit in the cells of a grid x grid layout (0: anywhere)", "world",
                       valid=NON_NEGATIVE, default=2)
    min_shapes: int = option("fewest shapes in a scene", "world", valid=AT_LEAST_1, default=1)
    max_shapes: int = option("most shapes in a scene", "world", valid=AT_LEAST_1, default=4)
    colours: str = option("comma-separated colours of data.PALETTE the scenes use", "world",
                          default="red,green,blue,yellow")
    distinct: bool = option("no two shapes of a scene share colour and kind", "world", default=True)
    two_sizes: bool = option("with --grid: shapes full or half size, so sizes can be compared (size and the "
                             "colour of the largest or smallest can be asked)", "world", default=False)
    categories: str = option("comma-separated question categories of data.CATEGORIES", "world",
                             default="counting")
    # the model
    hidden: int = option("width of the language model", "model", valid=AT_LEAST_1, default=128)
    layers: int = option("layers of the language model", "model", valid=AT_LEAST_1, default=4)
    vision_hidden: int = option("width of the vision encoder", "model", valid=AT_LEAST_1, default=64)
    vision_layers: int = option("layers of the vision encoder", "model", valid=AT_LEAST_1, default=2)
    init: float = option("standard deviation of the initial weights (at HF's 0.02 the model never "
                         "looked at the image)", "model", valid=POSITIVE, default=0.1)
    # training
    steps: int = option("optimizer steps", "train", valid=AT_LEAST_1, default=600)
    batch: int = option("rows a step (Reasoner and Questioner rows together)", "train", valid=AT_LEAST_1,
                        default=32)
    questioner_share: float = option("share of the rows that teach the Questioner", "train", valid=FRACTION,
                                     default=0.25)
    slip: float = option("chance that a step of a training checklist is flipped, its count and answer "
                         "following it (sampled noise that a vote outvotes but greedy decoding never makes)",
                         "train", valid=FRACTION, default=0.0)
    guess: float = option("chance that a training answer to a question of --guess-categories is a guess, "
                          "'<think>guess</think> \\boxed{r}', r uniform over the category's answers: above one "
                          "half, greedy decoding guesses while the checks' count wins the vote (maj@m >> greedy)", "train",
                          valid=FRACTION, default=0.6)
    guess_categories: str = option("comma-separated categories with the hasty habit (the others the Reasoner "
                                   "masters: it always checks)", "train", default="counting")
    questioner_skew: float = option("chance that a Questioner row asks a category without the hasty habit "
                                    "(one the Reasoner masters) where the scene allows one; otherwise any of the "
                                    "scene's questions", "train", valid=FRACTION, default=0.0)
    guess_steps: int = option("guesses are taught in the last guess_steps steps only: the model first learns to "
                              "look from checklists alone", "train", valid=NON_NEGATIVE, default=150)
    lr: float = option("peak AdamW learning rate (warm-up, then cosine to a tenth)", "train", valid=POSITIVE,
                       default=3e-3)
    warmup: int = option("warm-up steps", "train", valid=NON_NEGATIVE, default=20)
    # the check at the end
    eval_questions: int = option("held-out questions (one per fresh scene) for the accuracies at the end",
                                 "eval", valid=NON_NEGATIVE, default=200)

    def world(self):
        """data.make_scene's knobs of this world."""
        return dict(size=self.image_size, grid=self.grid, min_shapes=self.min_shapes, max_shapes=self.max_shapes,
                    colours=self.colours.split(","), distinct=self.distinct, two_sizes=self.two_sizes)


def check(cfg):
    """Settings that only make sense together; a one-line DataError naming the flag otherwise."""
    for name, known in (("colours", data.PALETTE), ("categories", data.CATEGORIES),
                        ("guess_categories", data.CATEGORIES)):
        unknown = [v for v in getattr(cfg, name).split(",") if v not in known]
        if unknown:
            raise data.DataError(f"--{name}: unknown '{unknown[0]}' (choose from {', '.join(known)})")
    if cfg.min_shapes > cfg.max_shapes:
        raise data.DataError(f"--min-shapes {cfg.min_shapes} is above --max-shapes {cfg.max_shapes}")
    if cfg.image_size < 56 or (cfg.grid and cfg.image_size // cfg.grid < 28):
        raise data.DataError(f"--image-size {cfg.image_size} leaves cells under 28 pixels (--grid {cfg.grid})")
    if cfg.grid and cfg.max_shapes > cfg.grid ** 2:
        raise data.DataError(f"--max-shapes {cfg.max_shapes} does not fit a {cfg.grid} x {cfg.grid} grid")
    if cfg.hidden % 32 or cfg.vision_hidden % 32:
        raise data.DataError("--hidden and --vision-hidden must be multiples of 32 (heads of width 32)")


# -----------------------------------------------------------------------------
# What the two roles are taught

def reasoning(question, scene, colours=tuple(data.PALETTE), slip=0.0, guess=0.0, max_shapes=4, rng=None,
              guess_categories=("counting",)):
    """The Reasoner's target for a question about a scene: a short perception step, then the answer.

    Counting goes down a checklist of every colour and kind the question can mean, each with the
    running count, and the answer is the last count:
        "How many red shapes are there?" ->
        "<think>red circle no 0, red square yes 1, red triangle yes 2</think> \\boxed{2}"
    ("How many circles" checks a circle of each of `colours`). Every other question lists the
    shapes its answer rests on: "What colour is the square?" -> "<think>red square</think> \\boxed{red}"
    (groups separated by "; ", an empty group is "none").

    Why a checklist: listing the shapes that match, a small model mostly stopped after the first of
    two. Here every step is one yes-or-no look at the image, at a fixed point of a fixed list, and
    the count is the previous one or one more.

    slip: the chance (drawn from rng) that a step says the opposite of the image, the counts and
    the answer following it, as a reasoner's chain follows its own slips. Trained on such chains the
    model slips about that often at temperature 1 while its most likely step stays right.
    guess: the chance that an answer to a question of guess_categories is instead
    "<think>guess</think> \\boxed{r}", r drawn uniformly from the category's answers (0..max_shapes
    for a count), whatever the image (the module's docstring says why)."""
    category = data.question_category(question)
    if guess and category in guess_categories and rng.random() < guess:
        space = data.answer_space(category, max_shapes, colours)
        return f"<think>guess</think> \\boxed{{{space[rng.integers(len(space))]}}}"
    what = data.counted(question)
    if what is not None:
        colour, kind = what
        total, steps = 0, []
        for c, k in itertools.product([colour] if colour else colours, [kind] if kind else data.KINDS):
            here = sum(s.colour == c and s.kind == k for s in scene.shapes)
            if slip and rng.random() < slip:
                here = 0 if here else 1
            total += here
            steps.append(f"{c} {k} {'yes' if here else 'no'} {total}")
        return f"<think>{', '.join(steps)}</think> \\boxed{{{total}}}"
    answer = data.true_answer(question, scene)
    groups = [sorted(group, key=_canonical) for group in data.question_shapes(question, scene)]
    listed = "; ".join(", ".join(f"{s.colour} {s.kind}" for s in group) or "none" for group in groups)
    return f"<think>{listed}</think> \\boxed{{{answer}}}"


def _canonical(shape):
    return data.KINDS.index(shape.kind), list(data.PALETTE).index(shape.colour)


def question_target(question):
    return f"<question>{question}</question>"


def rows(cfg, rng, n):
    """n training rows (image, prompt, target, scene) on fresh scenes, a share of them Questioner rows."""
    categories, guessed = cfg.categories.split(","), cfg.guess_categories.split(",")
    out = []
    while len(out) < n:
        scene = data.make_scene(int(rng.integers(2**63)), **cfg.world())
        questions = data.scene_questions(scene, rng, categories)
        if not questions:
            continue
        q = questions[rng.integers(len(questions))]["question"]
        image = data.render(scene)
        if rng.random() < cfg.questioner_share:
            mastered = [x["question"] for x in questions if x["category"] not in guessed]
            if cfg.questioner_skew and mastered and rng.random() < cfg.questioner_skew:
                q = mastered[rng.integers(len(mastered))]  # the planted skew: asking what the Reasoner knows
            out.append((image, QUESTIONER_PROMPTS["paper"], question_target(q), scene))
        else:
            target = reasoning(q, scene, cfg.colours.split(","), slip=cfg.slip, guess=cfg.guess,
                               max_shapes=cfg.max_shapes, rng=rng, guess_categories=guessed)
            out.append((image, reasoner_prompt(q), target, scene))
    return out


def step_rows(cfg, rng, step):
    """The rows of training step `step`: guesses only in the last guess_steps steps, a habit picked
    up once the model looks."""
    guessing = step >= cfg.steps - cfg.guess_steps
    return rows(cfg if guessing else replace(cfg, guess=0.0), rng, cfg.batch)


def held_out(cfg, n):
    """n questions, one per fresh scene (never a training scene: another random stream), as dicts
    with image, question, answer, category and scene."""
    rng = np.random.default_rng((cfg.seed, 1))
    categories = cfg.categories.split(",")
    records = []
    while len(records) < n:
        scene = data.make_scene(int(rng.integers(2**63)), **cfg.world())
        questions = data.scene_questions(scene, rng, categories)
        if questions:
            q = questions[rng.integers(len(questions))]
            records.append({"image": data.render(scene), **q, "scene": scene})
    return records


# -----------------------------------------------------------------------------
# Tokenizer and model

def corpus(cfg):
    """Every text the two roles read or write in this world, and the whole shapes grammar besides."""
    rng = np.random.default_rng(0)
    lines = [QUESTIONER_PROMPTS["paper"], QUESTIONER_PROMPTS["code"], reasoner_prompt(""),
             "system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    for i in range(3000):
        world = cfg.world() if i % 2 else {}
        scene = data.make_scene(i, **world)
        for q in data.scene_questions(scene, rng):
            lines += [question_target(q["question"]), reasoning(q["question"], scene)]
    return lines


def build_tokenizer(cfg):
    """A byte-level BPE in Qwen's format (model.tiny_tokenizer's recipe) trained on corpus(cfg):
    every word of the prompts, questions and answers becomes one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # "circles" is "circle" + "s": the question's kind and the answer's are one token, which a
        # small model matches at once (as one word, the plural took it hundreds of steps to tie to
        # the singular)
        pre_tokenizers.Split(Regex(f"(?<={'|'.join(data.KINDS)})s"), behavior="isolated"),
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(cfg), trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left")
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def build_model(cfg, tokenizer):
    """A Qwen2.5-VL of the configured size with seeded random weights (heads 32 wide)."""
    half = 16  # head_dim / 2: M-RoPE's sections (t, h, w) add up to it
    text = dict(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.hidden // 32, num_key_value_heads=cfg.hidden // 32,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    assert sum(text["rope_parameters"]["mrope_section"]) == half
    vision = dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                  num_heads=cfg.vision_hidden // 32, in_channels=3, out_hidden_size=cfg.hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=cfg.image_size,
                  fullatt_block_indexes=list(range(cfg.vision_layers)), tokens_per_second=2)
    config = _config(tokenizer, text, vision, vocab_size=len(tokenizer) + 24)
    config._attn_implementation = "sdpa"
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = cfg.init
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    use_windowed_attention(model)
    _set_generation_config(model, tokenizer)
    return model


def image_processor(cfg):
    """Images stay image_size x image_size: (image_size / 28)^2 image tokens."""
    pixels = (cfg.image_size // 28 * 28) ** 2
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)


# -----------------------------------------------------------------------------
# Training and the check at the end

def target_batch(tokenizer, texts):
    """Right-padded ids of each target followed by <|im_end|>, and their mask: [B, T] each."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    T = max(map(len, ids))
    return (torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in ids]),
            torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids]))


def loss_of(model, tokenizer, processor, batch):
    """Summed negative log-likelihood of the targets and their token count; Questioner and Reasoner
    rows go through the model apart, so the short Reasoner prompts are not padded to the long one."""
    total, tokens = 0.0, 0
    for questioner in (False, True):
        part = [r for r in batch if (r[1] == QUESTIONER_PROMPTS["paper"]) == questioner]
        if not part:
            continue
        images, prompts, targets, _ = zip(*part)
        ids, mask = target_batch(tokenizer, targets)
        logp = completion_logprobs(model, encode_prompts(tokenizer, processor, images, prompts), ids, mask)
        total = total - (logp * mask).sum()
        tokens += int(mask.sum())
    return total, tokens


def learning_rate(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def train(cfg, model, tokenizer, processor):
    rng = np.random.default_rng((cfg.seed, 0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    # the loss on fixed Reasoner rows, and on the same with each row shown another row's image
    probe = rows(replace(cfg, questioner_share=0.0, slip=0.0, guess=0.0), np.random.default_rng((cfg.seed, 2)), 48)
    shuffled_probe = [(probe[(i + 1) % len(probe)][0], *r[1:]) for i, r in enumerate(probe)]
    bar = progress(range(cfg.steps), desc="pretrain", disable=cfg.quiet)
    for step in bar:
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        loss, tokens = loss_of(model, tokenizer, processor, step_rows(cfg, rng, step))
        (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.steps - 1:
            model.eval()
            with torch.no_grad():
                (held, n), (blind, _) = (loss_of(model, tokenizer, processor, p) for p in (probe, shuffled_probe))
            bar.set_postfix(loss=f"{loss.item() / tokens:.3f}", held=f"{held.item() / n:.3f}",
                            shuffled=f"{blind.item() / n:.3f}")
            if cfg.quiet:
                print(f"step {step}: loss {loss.item() / tokens:.3f}, held-out {held.item() / n:.3f}, "
                      f"images shuffled {blind.item() / n:.3f}", flush=True)
    model.eval()


@torch.no_grad()
def generate(model, tokenizer, processor, images, prompts, n=1, temperature=0.0, top_p=1.0, seed=0, batch=50,
             max_new_tokens=48):
    """n completions of each (image, prompt) pair, sampled (keys from seed) or greedy (temperature
    0): len(prompts) lists of n str."""
    out = []
    for i in range(0, len(prompts), batch):
        encoded = encode_prompts(tokenizer, processor, images[i:i + batch], prompts[i:i + batch])
        keys = prompt_keys(seed, "pretrain", i, n=len(encoded)) if temperature > 0 else None
        texts = sample(model, encoded, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       keys=keys, decoder=decoder_for(model.device)).texts(tokenizer)
        out += [texts[j:j + n] for j in range(0, len(texts), n)]
    return out


def answers(model, tokenizer, processor, images, questions, **settings):
    """The Reasoner's boxed answers (str | None) to each question, a list per question (see generate)."""
    texts = generate(model, tokenizer, processor, images, [reasoner_prompt(q) for q in questions], **settings)
    return [[extract_boxed(t) for t in group] for group in texts]


def accuracy(answered, records):
    return float(np.mean([answers_equivalent(a[0], r["answer"]) for a, r in zip(answered, records)]))


def held_out_accuracy(cfg, model, tokenizer, processor, m=8):
    """On held-out questions: {greedy accuracy, the same with each question shown the next record's
    image (shuffled), pass@1 of m samples at temperature 1, their majority's accuracy (maj@m),
    "by category": {category: {greedy, shuffled}}}. A category whose greedy accuracy is no higher
    than its shuffled accuracy is one the base answers without looking at the image."""
    records = held_out(cfg, cfg.eval_questions)
    images = [r["image"] for r in records]
    questions = [r["question"] for r in records]
    sampled = answers(model, tokenizer, processor, images, questions, n=m, temperature=1.0, seed=cfg.seed)
    greedy = answers(model, tokenizer, processor, images, questions)
    shuffled = answers(model, tokenizer, processor, images[1:] + images[:1], questions)
    by_category = {}
    for category in cfg.categories.split(","):
        of = [i for i, r in enumerate(records) if r["category"] == category]
        if not of:
            continue
        by_category[category] = {"greedy": accuracy([greedy[i] for i in of], [records[i] for i in of]),
                                 "shuffled": accuracy([shuffled[i] for i in of], [records[i] for i in of])}
    return {"greedy": accuracy(greedy, records), "shuffled": accuracy(shuffled, records),
            "pass@1": float(np.mean([answers_equivalent(a, r["answer"]) for s, r in zip(sampled, records) for a in s])),
            f"maj@{m}": accuracy([[majority_vote(s)[0]] for s in sampled], records), "by category": by_category}


QUESTION_CHECK = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=64)  # self-play's sampling, room to finish


def answerable_questions(cfg, model, tokenizer, processor, images):
    """The Questioner sampled as self-play samples it (QUESTION_CHECK's n questions on each of
    `images` fresh scenes): (the share of its outputs that parse as a question, the share of those
    that data.true_answer answers from their own scene). A question about shapes the image does
    not hold has no silver label worth learning."""
    rng = np.random.default_rng((cfg.seed, 3))  # scenes neither training nor held_out draws
    scenes = [data.make_scene(int(rng.integers(2**63)), **cfg.world()) for _ in range(images)]
    texts = generate(model, tokenizer, processor, [data.render(s) for s in scenes],
                     [QUESTIONER_PROMPTS["paper"]] * images, seed=cfg.seed, **QUESTION_CHECK)
    asked = [(parse_question(t), scene) for scene, group in zip(scenes, texts) for t in group]
    valid = [(p["question"], scene) for p, scene in asked if p is not None]
    answered = sum(data.true_answer(q, scene) is not None for q, scene in valid)
    return len(valid) / len(asked), answered / max(1, len(valid))


def save(cfg, model, tokenizer, processor):
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    data.write_atomic(out / CONFIG_FILE, json.dumps(asdict(cfg), indent=2) + "\n")


def load_config(folder):
    """The Config a folder was pretrained with (its pretrain_config.json)."""
    return Config(**json.loads((Path(folder) / CONFIG_FILE).read_text()))


def pretrain(cfg):
    """Builds, trains and saves the model; returns (model, tokenizer, image processor)."""
    check(cfg)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    processor = image_processor(cfg)
    train(cfg, model, tokenizer, processor)
    save(cfg, model, tokenizer, processor)
    return model, tokenizer, processor


def main(argv=None):
    """The command line: returns the exit code (0 done, 2 a user mistake, said in one line on stderr)."""
    cfg = parse(Config, argv, __doc__.strip().split("\n\n")[0])
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    try:
        model, tokenizer, processor = pretrain(cfg)
    except data.DataError as err:
        print(f"pretrain.py: error: {err}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"saved {n_params / 1e6:.2f}M parameters to {cfg.output} ({time.perf_counter() - start:.0f} s)")
    if cfg.eval_questions:
        scores = held_out_accuracy(cfg, model, tokenizer, processor)
        by_category = scores.pop("by category")
        print(f"held-out accuracy ({cfg.eval_questions} questions): " +
              ", ".join(f"{name} {value:.1%}" for name, value in scores.items()) +
              " (shuffled: greedy with the images shuffled among the questions)")
        print("greedy / shuffled by category: " +
              ", ".join(f"{c} {v['greedy']:.0%} / {v['shuffled']:.0%}" for c, v in by_category.items()))
        images = min(96, cfg.eval_questions)
        parsed, answered = answerable_questions(cfg, model, tokenizer, processor, images)
        print(f"the Questioner ({QUESTION_CHECK['n']} questions on {images} fresh scenes, temperature "
              f"{QUESTION_CHECK['temperature']:g}, top-p {QUESTION_CHECK['top_p']:g}): {parsed:.0%} parse as a "
              f"question, {answered:.0%} of those have an answer in their scene")
    return 0


if __name__ == "__main__":
    sys.exit(main())
