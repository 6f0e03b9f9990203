"""Speed and memory of what costs time and memory in VisPlay, each speed next to a baseline measured
in the same run, on whatever device is there (cuda if available, else cpu).

    python tools/bench.py [--model random-3b] [--prompts 8] [--samples 8] [--new-tokens 256] [--repeats 3]
    python tools/bench.py --model tiny            # CPU, under a minute: a smoke test of this script
    python tools/bench.py --only sampler --json bench.json

1. Sampler vs HF `model.generate`, on the same P prompts (one image each) × n samples, T new tokens,
   the same temperature, top-p and suppressed tokens (model.generation_config). Three paths:
   - generate: `num_return_sequences=n`, `do_sample=True`, `top_k=0` (its default would be 50),
     `min_new_tokens=T`, and `mm_token_type_ids` (without it transformers 5.x drops M-RoPE);
   - ours, prefix shared: `sampler.sample(n=n)`, one prefill per prompt;
   - ours, not shared: the prompts repeated n times with `PromptBatch.select`, `sample(n=1)`.
   All paths must run exactly T steps: while timing, the model's stop id is set to <|image_pad|>,
   a suppressed token no path can draw, so no row ever stops (generate's `min_new_tokens` is then
   a no-op, kept as asked for). The new tokens each path produced are counted, and must all equal
   P·n·T. Greedy decoding (temperature 0) is timed too unless --no-greedy: generate cannot return
   n greedy sequences per input, so it gets the prompts repeated n times.
   Reported: ms per decode step (a whole call / T, so prefill is spread over the steps), new
   tokens/s, and ours/generate; on cuda also peak memory.
2. One GRPO step: the reference forward and `grpo.update` (one optimizer step, AdamW, KL to a
   frozen reference) on a batch of --grpo-rows completions of T random tokens after the same kind
   of prompts, set up as selfplay.py trains (float32 master weights; bf16 autocast and a bf16
   reference on cuda; activation checkpointing unless --no-gradient-checkpointing).
   Reported: step time, tokens/s (prompt + completion), peak memory, and model FLOP/s against the
   baseline, a matrix rate measured here: a bf16 8192³ matmul on cuda, a float32 1024³ one on cpu.
   FLOPs = (6 + 2) × trainable params × tokens: forward and backward, plus the reference's
   forward (with one optimizer step per batch the old log-probs are the training forward's own).
   Left out: attention scores (∝ length²), the
   vision tower seeing 4 patches per token, the head running on completion tokens only, and the
   head chunks recomputed in the backward pass; so the FLOP/s is a rough model-FLOPs figure.
3. Peak memory of each phase (questioner, curation, reasoner) at selfplay.py's own sizes, once per
   run of --memory-runs (selfplay.py's defaults at the paper's pixel bounds; with LoRA; with LoRA
   and half the sampling batch):
   `phase_peaks` holds the models a phase holds and goes through its memory-heavy moments with
   selfplay.py's own functions. Every sampler call is made at full length but ends after a few
   steps (the static cache is allocated for the longest completion up front, so memory does not
   depend on how long rows run); the GRPO step runs on a micro-batch of full-length completions.
   What it does not do is run a phase's many steps: their time, not their memory, grows with them.
   Off cuda the rows give the process's RSS high-water instead.
4. A miniature self-play iteration: `selfplay.py` run as a user runs it, into a temporary folder
   (1 iteration, 1 step per phase, the model's real pixel bounds, plus --selfplay-flags), with the
   wall time and, on cuda, the peak memory of each phase that it logs in phase_times.jsonl. The
   baseline of a phase's time is the whole command's. With random weights no question parses, so
   the Reasoner never votes and its phase is skipped: pass a trained checkpoint for a fuller
   picture. On a 3B model the run writes float32 checkpoints (with AdamW state under full
   fine-tuning, ~60 GB) to the temp folder.

Timing: one warm-up call, then --repeats timed calls (time.perf_counter, torch.cuda.synchronize
around each on cuda); the best is reported. Images are square shapes scenes of --image-size
pixels a side, and the image processor's bounds are set to exactly that many pixels, so every
image gives (side / 28)² tokens whatever the model's own bounds (448 -> 256 tokens, as in the
anchor figures of DESIGN.md).

Numbers from this script belong in BENCHMARKS.md, each with the exact command, the card and the
date (all three are printed above the table). On cuda "ours" is the decoder selfplay.py samples with there (fast_decode.decoder_for), the
static cache with its CUDA graph (fast_decode.py); on cpu it is the reference path. Left out:
multi-GPU, and a sampler baseline other than HF generate.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python tools/bench.py`: the modules it imports are in the repo root
    sys.path[0] = str(REPO)

import contextlib
import dataclasses
import gc
import json
import platform
import resource
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers

from machinery import policies
import questioner
import reasoner
from machinery.cli import AT_LEAST_1, NON_NEGATIVE, PROBABILITY, option, parse
from data import shapes_images, write_shapes_folder
from grpo import Rollouts, make_optimizer, update
from model import encode_prompts, load_vlm, rollout_logprobs, suppressed_mask
from machinery.fast_decode import decoder_for
from machinery.keys import prompt_keys
from sampler import sample

FIGURES = ("sampler", "grpo", "memory", "selfplay")
PROMPT = "Look at this image and write one question about it that needs reasoning to answer."
# What 0 means for the size settings: the paper's shapes for real models, small ones for "tiny".
SIZES = {"tiny": dict(image_size=112, new_tokens=64), "real": dict(image_size=448, new_tokens=256)}
# FLOPs of one GRPO step per trainable parameter and token: 6 for the forward and backward pass,
# 2 for the forward that gives the reference log-probs. (With one optimizer step per batch, as here,
# the old log-probs are the training forward's own.)
FLOPS_PER_PARAM_TOKEN = 6 + 2
MATMULS_PER_TIMING = 10  # one 8192³ bf16 matmul is ~2 ms on an H100: too short to time alone


@dataclass
class Config:
    model: str = option("'tiny', 'random-3b', a local folder or a hub id", default="random-3b")
    device: str = option("cuda, cpu, or auto", default="auto")
    only: str = option("comma-separated figures to run, of: " + ", ".join(FIGURES), default=",".join(FIGURES))
    json: str = option("also write the table and the raw measurements to this JSON file", default="")
    repeats: int = option("timed calls per measurement, after one warm-up; the best counts", valid=AT_LEAST_1,
                          default=3)
    seed: int = option("seeds the images, the random weights and sampling", default=0)
    prompts: int = option("P: prompts (images) of the sampler figure", valid=AT_LEAST_1, default=8)
    samples: int = option("n: samples per prompt; also the group size of the GRPO and self-play batches",
                        default=8)
    new_tokens: int = option("T: new tokens per sample, and completion length of the GRPO batch "
                           "(0: 256, or 64 for tiny)", default=0)
    image_size: int = option("side of the square images in pixels (0: 448, or 112 for tiny)", default=0)
    temperature: float = option("sampling temperature", valid=NON_NEGATIVE, default=1.0)
    top_p: float = option("sampling top-p", valid=PROBABILITY, default=0.99)
    greedy: bool = option("also time greedy decoding", default=True)
    grpo_rows: int = option("rows of the GRPO batch (groups of --samples)", default=16)
    micro_batch_tokens: int = option("padded tokens per forward/backward in the GRPO step",
                                     default=32768)  # selfplay.py's (a test holds the two equal)
    gradient_checkpointing: bool = option("recompute activations in the GRPO step's backward pass, as selfplay.py "
                                          "does by default", default=True)
    matmul_size: int = option("side of the matmul that measures the matrix rate (0: 8192 on cuda, 1024 on cpu)",
                            default=0)
    memory_runs: str = option("the memory figure's runs, separated by ';': each the selfplay.py flags it "
                              "adds to selfplay.py's defaults", default=" ;--lora-rank 16;--lora-rank 16 "
                              "--sampling-batch-tokens 196608")
    profile: str = option("comma-separated figures (sampler, grpo) of which one more call is profiled after the "
                          "timing, printing the ops that took the most time", default="")
    selfplay_images: int = option("images of the miniature self-play run", default=2)
    selfplay_tokens: int = option("max new tokens of its questions and answers", default=32)
    selfplay_flags: str = option("more selfplay.py flags for that run (full fine-tuning of a 3B model writes "
                                 "~60 GB of checkpoints; '--lora-rank 16' writes ~30)", default="")


def parse_config(argv=None):
    """The Config of argv; 0 sizes resolved for the model."""
    cfg = parse(Config, argv, __doc__.split("\n\n")[0])
    unknown = set(cfg.only.split(",")) - set(FIGURES)
    if unknown:
        raise SystemExit(f"bench.py: --only: unknown figure(s) {sorted(unknown)}; choose from {', '.join(FIGURES)}")
    if cfg.grpo_rows < cfg.samples or cfg.grpo_rows % cfg.samples:
        raise SystemExit(f"bench.py: --grpo-rows ({cfg.grpo_rows}) must be a multiple of --samples ({cfg.samples})")
    sizes = SIZES["tiny" if cfg.model == "tiny" else "real"]
    return dataclasses.replace(cfg, **{k: v for k, v in sizes.items() if getattr(cfg, k) == 0})


# -----------------------------------------------------------------------------
# Timing and memory

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeats):
    """One warm-up call of fn(), then `repeats` timed ones. Returns (best seconds, fn's last result)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device):
    """cuda: the peak allocated since the last reset. cpu: None (see process_rss_gib)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def print_profile(name, fn, device, rows=15):
    """One call of fn under torch.profiler; prints the ops with the most self time on the device
    (on the host for cpu)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one call: {name}\n{prof.key_averages().table(sort_by=key, row_limit=rows)}")


def process_rss_gib():
    """The process's resident-set high-water mark since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -----------------------------------------------------------------------------
# Models and prompts

def load(cfg, device, trainable):
    """As selfplay.py loads a role (policies.weights_dtype). The image processor's bounds are pinned to
    image_size² pixels."""
    pixels = cfg.image_size ** 2
    dtype = policies.weights_dtype(device, trainable)
    model, tokenizer, image_processor = load_vlm(cfg.model, device=device, dtype=dtype, seed=cfg.seed,
                                                 min_pixels=pixels, max_pixels=pixels)
    model.requires_grad_(trainable)
    return model, tokenizer, image_processor


def make_prompts(tokenizer, image_processor, n_prompts, image_size, seed):
    """n_prompts shapes scenes with the same instruction -> a PromptBatch on the CPU."""
    return encode_prompts(tokenizer, image_processor, shapes_images(n_prompts, seed, image_size),
                          [PROMPT] * n_prompts)


# -----------------------------------------------------------------------------
# Figure 1: sampler vs HF generate

@contextlib.contextmanager
def stop_ids(model, ids):
    """While inside, `ids` are the model's only stop tokens."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = list(ids)
    try:
        yield
    finally:
        config.eos_token_id = saved


def no_stop_tokens(model):
    """While inside, the only stop id is <|image_pad|>, which is suppressed: no row ever stops."""
    never = model.config.image_token_id
    assert never in model.generation_config.suppress_tokens, "the stand-in stop id must be a suppressed token"
    return stop_ids(model, [never])


def ours(model, prompts, n, new_tokens, temperature, top_p, seed):
    """sampler.sample -> the number of new tokens it produced."""
    out = sample(model, prompts, n=n, max_new_tokens=new_tokens, temperature=temperature, top_p=top_p,
                 keys=prompt_keys(seed, n=len(prompts)), decoder=decoder_for(model.device))
    return int(out.mask.sum())


def hf_generate(model, prompts, n, new_tokens, temperature, top_p, seed):
    """model.generate with the same settings -> the number of new tokens it produced."""
    if temperature == 0:  # greedy generate returns one sequence per input: repeat the inputs instead
        prompts, n, sampling = prompts.repeat(n), 1, dict(do_sample=False)
    else:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    torch.manual_seed(seed)
    image_tokens = (prompts.input_ids == model.config.image_token_id).int()  # M-RoPE needs it in 5.x
    out = model.generate(
        input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, pixel_values=prompts.pixel_values,
        image_grid_thw=prompts.image_grid_thw, mm_token_type_ids=image_tokens, num_return_sequences=n,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sampling)
    return out.shape[0] * (out.shape[1] - prompts.input_ids.shape[1])


def measure_sampler(model, prompts, n, new_tokens, temperature, top_p, repeats, seed=0, profile=False):
    """Times the three paths of figure 1 on `prompts` (a PromptBatch on the model's device).

    Returns {"generate" | "ours_shared" | "ours_unshared": {seconds, new_tokens, ms_per_step,
    tokens_per_s, peak_gib}, ...}; each ours path also has ratio = its tokens/s / generate's.
    Raises if the paths did not all produce P·n·T new tokens. profile: print_profile of ours, shared.
    """
    device = model.device
    args = (new_tokens, temperature, top_p, seed)
    paths = {"generate": lambda: hf_generate(model, prompts, n, *args),
             "ours_shared": lambda: ours(model, prompts, n, *args),
             "ours_unshared": lambda: ours(model, prompts.repeat(n), 1, *args)}
    record = {}
    with no_stop_tokens(model):
        for name, run in paths.items():
            reset_peak_memory(device)
            seconds, produced = best_time(run, device, repeats)
            record[name] = {"seconds": seconds, "new_tokens": produced, "ms_per_step": 1000 * seconds / new_tokens,
                            "tokens_per_s": produced / seconds, "peak_gib": peak_memory_gib(device)}
        if profile:
            print_profile(f"sampler, ours (one prefill, n samples), temperature {temperature}", paths["ours_shared"],
                          device)
    expected = len(prompts) * n * new_tokens
    counts = {name: r["new_tokens"] for name, r in record.items()}
    if set(counts.values()) != {expected}:
        raise RuntimeError(f"the paths must each produce P·n·T = {expected} new tokens, got {counts}")
    for name in ("ours_shared", "ours_unshared"):
        record[name]["ratio"] = record[name]["tokens_per_s"] / record["generate"]["tokens_per_s"]
    return record


def sampler_figure(cfg, model, tokenizer, image_processor):
    prompts = make_prompts(tokenizer, image_processor, cfg.prompts, cfg.image_size, cfg.seed)
    prompts = prompts.to(model.device)
    modes = {f"top-p {cfg.top_p}, temperature {cfg.temperature}": (cfg.temperature, cfg.top_p)}
    if cfg.greedy:
        modes["greedy"] = (0.0, 1.0)
    records, rows = {}, []
    for mode, (temperature, top_p) in modes.items():
        record = measure_sampler(model, prompts, cfg.samples, cfg.new_tokens, temperature, top_p,
                                 cfg.repeats, cfg.seed, "sampler" in cfg.profile.split(","))
        records[mode] = record
        base = record["generate"]
        for name, label in (("ours_shared", "one prefill, n samples"), ("ours_unshared", "prompts repeated n times")):
            mine = record[name]
            rows.append(row(f"{mode}: ms per decode step, ours ({label})", "ms", mine["ms_per_step"],
                            base["ms_per_step"], "HF generate"))
            rows.append(row(f"{mode}: new tokens/s, ours ({label})", "tok/s", mine["tokens_per_s"],
                            base["tokens_per_s"], "HF generate"))
            if mine["peak_gib"] is not None:
                rows.append(row(f"{mode}: peak memory, ours ({label})", "GiB", mine["peak_gib"],
                                base["peak_gib"], "HF generate"))
    record = {"prompt_length": prompts.input_ids.shape[1], "image_tokens": int(prompts.image_grid_thw[0].prod()) // 4,
              "modes": records}
    return record, rows


# -----------------------------------------------------------------------------
# Figure 2: one GRPO step

def matmul_rate(device, size, repeats):
    """FLOP/s of a size³ matmul (bf16 on cuda, float32 on cpu), best of `repeats` timings of
    MATMULS_PER_TIMING back-to-back products."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def matmuls():
        for _ in range(MATMULS_PER_TIMING):
            a @ b
    seconds, _ = best_time(matmuls, device, repeats)
    return {"flops_per_s": MATMULS_PER_TIMING * 2 * size ** 3 / seconds, "size": size,
            "dtype": str(dtype).removeprefix("torch.")}


def random_rollouts(model, prompts, G, T, seed):
    """A group of G rows per prompt of `prompts`, each with T random allowed tokens (all valid) and a
    random reward."""
    generator = torch.Generator().manual_seed(seed)
    allowed = (~suppressed_mask(model)).nonzero().flatten().cpu()
    ids = allowed[torch.randint(len(allowed), (len(prompts) * G, T), generator=generator)]
    return Rollouts(prompts.repeat(G), ids, torch.ones_like(ids), torch.randn(len(ids), generator=generator), G, T)


def grpo_figure(cfg, device, reference, tokenizer, image_processor):
    policy = load(cfg, device, trainable=True)[0]
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    optimizer = make_optimizer(policy)
    prompts = make_prompts(tokenizer, image_processor, cfg.grpo_rows // cfg.samples, cfg.image_size, cfg.seed)
    rollouts = random_rollouts(policy, prompts, cfg.samples, cfg.new_tokens, cfg.seed)
    advantages = rollouts.advantages()

    def step():  # the reference forward belongs to the step: selfplay.py runs it before each update
        ref_logp = rollout_logprobs(reference, rollouts, cfg.micro_batch_tokens, 1.0)
        return update(policy, optimizer, rollouts, advantages, ref_logp, micro_batch_tokens=cfg.micro_batch_tokens)
    reset_peak_memory(device)
    seconds, _ = best_time(step, device, cfg.repeats)
    peak = peak_memory_gib(device)
    if "grpo" in cfg.profile.split(","):
        print_profile("GRPO step", step, device)
    rate = matmul_rate(device, cfg.matmul_size or (8192 if device.type == "cuda" else 1024), cfg.repeats)
    params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    tokens = int(rollouts.prompts.attention_mask.sum() + rollouts.mask.sum())
    flops = FLOPS_PER_PARAM_TOKEN * params * tokens
    record = {"rows": len(rollouts), "tokens": tokens, "trainable_params": params, "seconds": seconds,
              "flops": flops, "peak_gib": peak, "process_rss_gib": process_rss_gib(), "matmul": rate}
    matmul = f"{rate['dtype']} {rate['size']}³ matmul"
    rows = [row(f"GRPO step ({len(rollouts)} rows × {tokens // len(rollouts)} tokens): model TFLOP/s (ratio: MFU)",
                "TFLOP/s", flops / seconds / 1e12, rate["flops_per_s"] / 1e12, matmul),
            row("GRPO step: time", "s", seconds),
            row("GRPO step: tokens/s (prompt + completion)", "tok/s", tokens / seconds)]
    if peak is not None:
        rows.append(row("GRPO step: peak memory", "GiB", peak))
    else:
        rows.append(row("process RSS high-water so far (cpu; no per-step peak)", "GiB", record["process_rss_gib"]))
    return record, rows


# -----------------------------------------------------------------------------
# Figure 3: peak memory of each self-play phase

QUESTION = "How many shapes in this picture are red, and is the largest of them left of the smallest one?"
MEMORY_IMAGES = 32  # distinct images for the fullest sampler call at selfplay.py's defaults; more reuse them


def stop_at_once(*models):
    """While inside, every token is a stop token. The static cache (fast_decode.py) is allocated
    for the longest completion whatever the rows do, so a sampler call still takes the memory of a
    full-length one, but ends after a few steps."""
    stack = contextlib.ExitStack()
    for model in models:
        stack.enter_context(stop_ids(model, range(model.config.text_config.vocab_size)))
    return stack


def phase_peaks(scfg, device, images):
    """The memory-heavy moments of each phase of a self-play iteration k >= 2 under selfplay.py's
    Config `scfg`, holding the models that phase holds (policies.frozen_models; from k = 2 on the
    Questioner's reference Q_{k-1} and its Reasoner R_{k-1} are two models; with LoRA both share
    the policy's weights, and the roles' earlier updates, ~120 MB per phase at r = 16, are left
    out), in order:
    every sampler call at full length (stop_at_once) with as many prompts as fill its KV cache of
    --sampling-batch-tokens; then one GRPO step (policies.Trainee.grpo_step, one optimizer step) on a
    micro-batch of full-length completions. Questions asked of the Reasoner are one short question
    (QUESTION). `images` are used in turn, as many as each call needs.
    Returns {phase: peak GiB since the phase began} on cuda; off cuda, the process's RSS high-water.
    """
    G, seed, budget = scfg.group_size, scfg.seed, scfg.sampling_batch_tokens
    writing, answering = questioner.QUESTIONER_PROMPTS[scfg.question_format], reasoner.reasoner_prompt(QUESTION)
    settings = policies.sampling_settings(scfg)
    one_step = SimpleNamespace(**{**vars(scfg), "minibatches": 1, "epochs": 1})

    def shown(text, rows, new_tokens, max_tokens):
        """Images for as many prompts of `text` as fit in max_tokens (at least one), a prompt taking
        `rows` rows of its own length plus new_tokens."""
        prompt_tokens = encode_prompts(tok, ip, images[:1], [text]).input_ids.shape[1]
        count = max(1, max_tokens // (rows * (prompt_tokens + new_tokens)))
        return [images[i % len(images)] for i in range(count)]

    def write(model, n):  # one sampler call of n questions per image, its KV cache full
        shown_images = shown(writing, n, scfg.question_max_tokens, budget)
        questioner.write_questions(policies.as_sampler(scfg, model, processors), shown_images,
                                   prompt_keys(seed, "questions", n=len(shown_images)), n=n,
                                   settings=settings.question, fmt=scfg.question_format)

    def answer(model, m):  # one sampler call of m answers per question, its KV cache full
        asked = shown(answering, m, scfg.answer_max_tokens, budget)
        reasoner.ask_and_vote(policies.as_sampler(scfg, model, processors), asked, [QUESTION] * len(asked),
                              prompt_keys(seed, "answers", n=len(asked)), reasoner.Vote(m=m, sampling=settings.answer))

    def filling_one_micro_batch(text, T):
        """Prompts of enough groups of G full-length rows (T tokens) to fill the largest micro-batch."""
        groups = -(-len(shown(text, 1, T, scfg.micro_batch_tokens)) // G)
        return encode_prompts(tok, ip, [images[i % len(images)] for i in range(groups)], [text] * groups)

    def frozen(beside=None):
        return policies.sampling_role(scfg, device, scfg.model, beside)

    def finish(name, peaks):
        peaks[name] = peak_memory_gib(device) if device.type == "cuda" else process_rss_gib()
        gc.collect()
        reset_peak_memory(device)

    peaks = {}
    reset_peak_memory(device)
    # Questioner: Q_k trains; R_{k-1} answers each question m times; the KL reference is Q_{k-1}.
    trainee = policies.Trainee(one_step, scfg.model, device)
    policy, processors = trainee.model, trainee.processors
    tok, ip = processors
    answerer = frozen(beside=policy)
    reference = policy if scfg.lora_rank else frozen()
    with stop_at_once(policy, answerer):
        write(policy, G)
        answer(answerer, scfg.reward_votes)
    prompts = filling_one_micro_batch(writing, scfg.question_max_tokens)
    trainee.grpo_step(random_rollouts(policy, prompts, G, scfg.question_max_tokens, seed), reference)
    del trainee, policy, answerer, reference
    finish("questioner", peaks)
    # Curation: Q_k writes N candidates per image; R_{k-1} votes m times on each.
    writer = frozen()
    answerer = frozen(beside=writer)
    with stop_at_once(writer, answerer):
        write(writer, scfg.candidates_per_image)
        answer(answerer, scfg.curation_votes)
    del writer, answerer
    finish("curation", peaks)
    # Reasoner: R_k trains on G answers per kept question; the KL reference is R_{k-1}.
    trainee = policies.Trainee(one_step, scfg.model, device)
    policy = trainee.model
    reference = policy if scfg.lora_rank else frozen()
    with stop_at_once(policy):
        answer(policy, G)
    prompts = filling_one_micro_batch(answering, scfg.answer_max_tokens)
    trainee.grpo_step(random_rollouts(policy, prompts, G, scfg.answer_max_tokens, seed), reference)
    del trainee, policy, reference
    finish("reasoner", peaks)
    return peaks


def selfplay_config(argv):
    """selfplay.py's settings for these flags, as its --print-config shows them: the memory figure
    runs the loop's own functions (policies, questioner, reasoner) under them, and nothing imports
    selfplay.py."""
    done = subprocess.run([sys.executable, str(REPO / "selfplay.py"), "--print-config", *argv],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"selfplay.py --print-config exited with {done.returncode}: {done.stderr}")
    return SimpleNamespace(**json.loads(done.stdout))


PAPER_PIXELS = ["--min-pixels", "262144", "--max-pixels", "4194304"]


def memory_figure(cfg, device):
    """phase_peaks for each run of --memory-runs, at the paper's pixel bounds."""
    record, rows = {}, []
    for flags in cfg.memory_runs.split(";"):
        scfg = selfplay_config(["--model", cfg.model, "--device", str(device), "--seed", str(cfg.seed),
                                *PAPER_PIXELS, *shlex.split(flags)])
        images = shapes_images(MEMORY_IMAGES, cfg.seed, cfg.image_size)
        label = flags.strip() or "selfplay.py defaults"
        record[label] = phase_peaks(scfg, device, images)
        what = "peak memory of" if device.type == "cuda" else "process RSS high-water (cpu) after"
        rows += [row(f"{what} the {phase} phase ({label})", "GiB", peak) for phase, peak in record[label].items()]
    return record, rows


# -----------------------------------------------------------------------------
# Figure 4: a miniature self-play iteration

def selfplay_argv(cfg, device, images, output):
    argv = ["--images", str(images), "--model", cfg.model, "--output", str(output), "--device", str(device),
            "--seed", str(cfg.seed), "--iterations", "1", "--questioner-steps", "1", "--reasoner-steps", "1",
            "--group-size", str(cfg.samples), "--images-per-step", str(cfg.selfplay_images),
            "--question-max-tokens", str(cfg.selfplay_tokens), "--answer-max-tokens", str(cfg.selfplay_tokens),
            "--reward-votes", str(cfg.samples), "--curation-images", str(cfg.selfplay_images),
            "--candidates-per-image", str(cfg.samples), "--curation-votes", str(cfg.samples),
            "--questions-per-step", "1", "--minibatches", "1", "--micro-batch-tokens", str(cfg.micro_batch_tokens),
            "--quiet"]
    return argv + shlex.split(cfg.selfplay_flags)


def selfplay_figure(cfg, device):
    """Runs selfplay.py as users do, then reads the time and peak memory of each phase from the
    run's phase_times.jsonl."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_shapes_folder(folder / "images", cfg.selfplay_images, cfg.seed, cfg.image_size)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "selfplay.py"),
                               *selfplay_argv(cfg, device, folder / "images", folder / "run")],
                              capture_output=True, text=True)
        total = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"selfplay.py exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        metrics = [json.loads(line) for line in open(folder / "run" / "metrics.jsonl")]
        phases = [json.loads(line) for line in open(folder / "run" / "phase_times.jsonl")]
    rows = []
    for p in phases:
        if p["phase"] == "summary":
            continue
        lines = [m for m in metrics if m["phase"] == p["phase"]]
        rows.append(row(f"self-play {p['phase']} phase ({phase_note(p['phase'], lines)}): time", "s", p["seconds"],
                        total, "whole selfplay.py run"))
        if p["peak_mem_gb"] is not None:
            rows.append(row(f"self-play {p['phase']} phase: peak memory", "GiB", p["peak_mem_gb"]))
    return {"seconds": total, "phases": phases, "metrics": metrics}, rows


def phase_note(name, lines):
    """What a phase did, from its lines of metrics.jsonl."""
    if name == "curation":
        return f"{lines[0]['n_kept']} of {lines[0]['n_candidates']} questions kept"
    return f"{len(lines)} step(s)" if lines else "skipped: curation kept too few"


# -----------------------------------------------------------------------------
# The table

def row(figure, unit, ours, baseline=None, baseline_is=""):
    """One line of the table; ratio = ours / baseline, computed here from the two measurements."""
    return {"figure": figure, "unit": unit, "ours": ours, "baseline": baseline, "baseline_is": baseline_is,
            "ratio": ours / baseline if baseline else None}


def number(value):
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(header, rows):
    lines = [f"{k}: {v}" for k, v in header.items()]
    lines += ["", "| figure | ours | baseline | ratio |", "|---|---|---|---|"]
    for r in rows:
        baseline = f"{number(r['baseline'])} {r['unit']} ({r['baseline_is']})" if r["baseline"] is not None else "—"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else "—"
        lines.append(f"| {r['figure']} | {number(r['ours'])} {r['unit']} | {baseline} | {ratio} |")
    return "\n".join(lines)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    cfg = parse_config(argv)
    figures = cfg.only.split(",")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    header = {"command": " ".join(["python tools/bench.py", *(sys.argv[1:] if argv is None else argv)]),
              "device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "model": cfg.model,
              "shapes": f"P={cfg.prompts} prompts × n={cfg.samples} samples, T={cfg.new_tokens} new tokens, "
                        f"{cfg.image_size}×{cfg.image_size} images, best of {cfg.repeats}"}
    records, rows = {}, []
    if {"sampler", "grpo"} & set(figures):
        model, tokenizer, image_processor = load(cfg, device, trainable=False)
        if "sampler" in figures:
            records["sampler"], new_rows = sampler_figure(cfg, model, tokenizer, image_processor)
            rows += new_rows
        if "grpo" in figures:
            records["grpo"], new_rows = grpo_figure(cfg, device, model, tokenizer, image_processor)
            rows += new_rows
        del model
        reset_peak_memory(device)
    if "memory" in figures:
        records["memory"], new_rows = memory_figure(cfg, device)
        rows += new_rows
    if "selfplay" in figures:
        records["selfplay"], new_rows = selfplay_figure(cfg, device)
        rows += new_rows
    print(table(header, rows))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"header": header, "config": dataclasses.asdict(cfg), "rows": rows,
                                              "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
