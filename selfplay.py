"""VisPlay self-play from one command: a Questioner and a Reasoner, both grown from one base VLM,
take turns for K iterations on a folder of unlabeled images (spec: "Roles and loop").

    python selfplay.py --images dir/ [--model Qwen/Qwen2.5-VL-3B-Instruct] [--output runs/name]
    python selfplay.py --resume runs/name

Iteration k = 1..K:
  1. Questioner phase: Q_k starts from Q_{k-1} (Q_0 = base) and is trained with GRPO; its reward
     comes from the frozen Reasoner R_{k-1} (R_0 = base) answering each question m times.
  2. Curation: Q_k writes N questions per image of the curation pool; R_{k-1} answers each m times;
     the majority answer is the silver label, and questions with confidence in [τ_low, τ_high] are
     kept (iter_k/questions.jsonl holds every candidate).
  3. Reasoner phase: R_k starts from R_{k-1} and is trained with GRPO on the kept triples.
The KL term of each phase pulls the role toward its weights at the start of the iteration
(`kl_reference = "iteration"`, Q_{k-1} or R_{k-1}) or toward the base model ("base").

Everything lands in the run folder: config.json, metrics.jsonl, iter_k/{questioner,reasoner}/
(save_pretrained, safetensors; with --lora-rank also the role's low-rank updates, from which its
next phase starts), iter_k/questions.jsonl, state.json, skipped_images.txt, images.txt,
phase_times.jsonl (wall time and peak memory of each phase) and report.html. state.json is written
last, atomically, after every training step, together with a checkpoint of the role in training
(weights, AdamW state, RNG states; with --lora-rank only the adapters): a killed run resumes from
the last finished step and ends bitwise equal to an uninterrupted one on CPU. Ctrl-C stops after
the step in progress (a second Ctrl-C stops at once, losing that step).

Left out: multi-GPU, the validation benchmark during training (run evaluate.py on the
checkpoints), and learning-rate schedules (the spec's lr is constant).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import grpo
import lora
import questioner
import reasoner
from cli import AT_LEAST_1, AT_LEAST_2, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, option, parse
from data import DataError, load_image, readable_images, write_atomic
from model import ModelError, load_processors, load_vlm
from report import write_report
from sampler import SamplingSettings


@dataclass
class Config:
    # run
    images: str = option("folder of unlabeled images (searched recursively)", "run", default="")
    output: str = option("run folder (default: runs/<date>-<time>)", "run", default="")
    resume: str = option("continue the run in this folder, with its saved config", "run", default="")
    model: str = option("hub id, local folder, 'tiny' (offline) or 'random-3b'", "run",
                        default="Qwen/Qwen2.5-VL-3B-Instruct")
    device: str = option("cuda, cpu, or auto", "run", default="auto")
    seed: int = option("seeds sampling, image choice and the presets' random weights", "run", default=0)
    quiet: bool = option("no progress bars (for logs)", "run", default=False)
    # loop
    iterations: int = option("self-play iterations K", "loop", valid=AT_LEAST_1, default=3)
    questioner_steps: int = option("GRPO steps of the Questioner per iteration", "loop", valid=NON_NEGATIVE,
                                   default=20)
    reasoner_steps: int = option("GRPO steps of the Reasoner per iteration", "loop", valid=NON_NEGATIVE,
                                 default=20)
    group_size: int = option("G: samples per prompt in both roles' rollouts", "loop", valid=AT_LEAST_2, default=8)
    min_pixels: int = option("images are resized to at least this many pixels", "loop", valid=AT_LEAST_1,
                             default=262_144)
    max_pixels: int = option("... and at most this many", "loop", valid=AT_LEAST_1, default=4_194_304)
    sampling_batch_tokens: int = option("KV-cache tokens per sampler call, rows x (prompt + max new tokens): as "
                                        "many prompts as fit, at least one (393216: 13.5 GiB for the 3B; 8 "
                                        "prompts of m = 10 answers of 4096 tokens)", "loop", valid=AT_LEAST_1,
                                        default=393_216)
    # questioner
    question_format: str = option("'paper': <question> only; 'code': <type>/<question>/<answer>", "questioner",
                                  choices=("paper", "code"), default="paper")
    images_per_step: int = option("images per Questioner rollout step (G questions each)", "questioner",
                                  valid=AT_LEAST_1, default=64)
    question_max_tokens: int = option("max new tokens of a question", "questioner", valid=AT_LEAST_1, default=2048)
    reward_votes: int = option("m: Reasoner answers per question for the uncertainty reward", "questioner",
                               valid=AT_LEAST_1, default=10)
    reward_top_k: int = option("top-k of those answers", "questioner", valid=NON_NEGATIVE, default=40)
    uncertainty_scale: str = option("'paper': 1 - |2c - 1|; 'code': min(c, 1 - c)", "questioner",
                                    choices=("paper", "code"), default="paper")
    diversity_scope: str = option("'group': cluster within an image's G questions; 'batch': whole batch",
                                  "questioner", choices=("group", "batch"), default="group")
    diversity_weight: float = option("λ of the diversity penalty", "questioner", valid=NON_NEGATIVE, default=1.0)
    reward_combine: str = option("'paper': valid · max(0, r_unc - r_div); 'code': no clamp, -1 if invalid",
                                 "questioner", choices=("paper", "code"), default="paper")
    reward_count_empty: bool = option("answers without \\boxed{} vote for 'None' in the reward (public code)",
                                      "questioner", default=True)
    # curation
    curation_images: int = option("images in the curation pool", "curation", valid=AT_LEAST_1, default=1000)
    candidates_per_image: int = option("N: questions written per curation image", "curation", valid=AT_LEAST_1,
                                       default=8)
    curation_top_p: float = option("top-p when writing candidates", "curation", valid=PROBABILITY, default=0.95)
    curation_votes: int = option("m: Reasoner answers per candidate", "curation", valid=AT_LEAST_1, default=9)
    tau_low: float = option("keep a question if its confidence is >= tau_low ...", "curation", valid=FRACTION,
                            default=0.25)
    tau_high: float = option("... and <= tau_high (code: 0.3 / 0.8)", "curation", valid=FRACTION, default=0.75)
    curation_count_empty: bool = option("count answers without \\boxed{} in the confidence", "curation",
                                        default=False)
    on_too_few: str = option("when fewer questions are kept than one Reasoner batch: 'skip' the phase "
                             "(R_k = R_{k-1}) or 'stop'", "curation", choices=("skip", "stop"), default="skip")
    # reasoner
    questions_per_step: int = option("kept questions per Reasoner rollout step (G answers each)", "reasoner",
                                     valid=AT_LEAST_1, default=64)
    answer_max_tokens: int = option("max new tokens of an answer", "reasoner", valid=AT_LEAST_1, default=4096)
    reasoner_reward: str = option("'paper': binary accuracy; 'code': 0.9 accuracy + 0.1 format", "reasoner",
                                  choices=("paper", "code"), default="paper")
    # grpo
    lr: float = option("AdamW learning rate (constant)", "grpo", valid=POSITIVE, default=1e-6)
    weight_decay: float = option("AdamW weight decay", "grpo", valid=NON_NEGATIVE, default=0.01)
    temperature: float = option("rollout temperature", "grpo", valid=NON_NEGATIVE, default=1.0)
    top_p: float = option("rollout top-p", "grpo", valid=PROBABILITY, default=0.99)
    clip_low: float = option("ε_low of the ratio clip", "grpo", valid=FRACTION, default=0.2)
    clip_high: float = option("ε_high of the ratio clip (clip-higher)", "grpo", valid=NON_NEGATIVE, default=0.3)
    dual_clip: float = option("dual clip c for negative advantages", "grpo", valid=(lambda c: c > 1, "more than 1"),
                              default=3.0)
    kl_coef: float = option("β of the k3 KL term (0 = no reference model)", "grpo", valid=NON_NEGATIVE, default=0.01)
    kl_reference: str = option("'iteration': the role's weights at the start of the iteration; 'base'", "grpo",
                               choices=("iteration", "base"), default="iteration")
    advantage_scale: str = option("'group', 'batch' or 'none' (see grpo.group_advantages)", "grpo",
                                  choices=("group", "batch", "none"), default="group")
    aggregation: str = option("seq-mean-token-mean, token-mean or seq-sum-over-max-len", "grpo",
                              choices=grpo.AGGREGATIONS, default="seq-mean-token-mean")
    minibatches: int = option("optimizer steps per rollout batch", "grpo", valid=AT_LEAST_1, default=4)
    epochs: int = option("passes over each rollout batch", "grpo", valid=AT_LEAST_1, default=1)
    micro_batch_tokens: int = option("padded tokens (prompt + completion) per forward/backward, as many rows as "
                                     "fit, at least one (gradient accumulation)", "grpo", valid=AT_LEAST_1,
                                     default=32768)
    gradient_checkpointing: bool = option("recompute each layer's activations in the backward pass (less memory)",
                                          "grpo", default=True)
    freeze_vision: bool = option("train the language model only (the spec trains the vision tower too)", "grpo",
                                 default=False)
    lora_rank: int = option("train LoRA adapters of this rank instead of all weights (0: full fine-tuning)",
                            "grpo", valid=NON_NEGATIVE, default=0)
    lora_alpha: float = option("LoRA scale α (the update is α / r · B A); LoRA wants a larger --lr than 1e-6",
                               "grpo", valid=POSITIVE, default=32.0)
    max_grad_norm: float = option("gradient-norm clip", "grpo", valid=POSITIVE, default=1.0)


# -----------------------------------------------------------------------------
# Atomic files

def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_folder_atomic(folder, write):
    """Calls write(tmp_folder), then renames it to `folder` (replacing an older one)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# -----------------------------------------------------------------------------
# Run state: where we are, and everything needed to continue bitwise

@dataclass
class State:
    iteration: int = 1
    phase: str = "questioner"  # questioner -> curation -> reasoner -> (next iteration) ... -> done
    step: int = 0              # finished steps of the phase
    metrics_lines: int = 0     # lines of metrics.jsonl that belong to the finished steps
    sampling_rng: list = field(default_factory=list)
    image_rng: dict = field(default_factory=dict)
    checkpoint: str = ""       # the role in training (weights + optimizer), relative to the run folder
                               # so the folder can move; "" between phases
    device: str = ""           # the kind of device sampling_rng belongs to ("cuda", "cpu")


class Run:
    """The run folder, its state, and the random number generators that state.json captures."""

    def __init__(self, cfg, folder, state, device):
        self.cfg, self.dir, self.state, self.device = cfg, Path(folder), state, device
        self.generator = torch.Generator(device=device)
        self.image_rng = np.random.default_rng(cfg.seed)
        # (state.device is "" in a state saved before the device was recorded)
        if state.sampling_rng and state.device and state.device != device.type:
            raise DataError(f"cannot resume on {device.type}: this run samples on {state.device}, and its random "
                            f"generator cannot move there; pass --device {state.device}")
        if state.sampling_rng:
            self.generator.set_state(torch.tensor(state.sampling_rng, dtype=torch.uint8))
            self.image_rng.bit_generator.state = state.image_rng
        else:
            self.generator.manual_seed(cfg.seed)

    def save_state(self, **changes):
        for k, v in changes.items():
            setattr(self.state, k, v)
        self.state.sampling_rng = self.generator.get_state().tolist()
        self.state.device = self.device.type
        self.state.image_rng = self.image_rng.bit_generator.state
        (self.dir / "metrics.jsonl").touch()
        self.state.metrics_lines = sum(1 for _ in open(self.dir / "metrics.jsonl"))
        write_json(self.dir / "state.json", dataclasses.asdict(self.state))

    def log(self, record):
        append_jsonl(self.dir / "metrics.jsonl", record)

    def role_dir(self, k, role):
        return self.dir / f"iter_{k}" / role

    def role_source(self, k, role):
        """Where role starts iteration k: the base model, or its checkpoint of iteration k - 1."""
        return self.cfg.model if k == 1 else str(self.role_dir(k - 1, role))


def check_bounds(cfg):
    """Pairs of settings where one bounds the other (each alone is checked by its flag)."""
    for low, high in (("tau_low", "tau_high"), ("min_pixels", "max_pixels")):
        if getattr(cfg, low) > getattr(cfg, high):
            flag = {name: "--" + name.replace("_", "-") for name in (low, high)}
            raise DataError(f"{flag[low]} {getattr(cfg, low)} is above {flag[high]} {getattr(cfg, high)}")


RESUME_MAY_CHANGE = ("resume", "quiet", "device")  # a device of the same kind: cuda:1 for cuda:0


def resolve_config(cfg):
    """The config to run: the CLI's, or for --resume the run's saved one (RESUME_MAY_CHANGE aside)."""
    if not cfg.resume:
        return cfg
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config)
             if f.name not in RESUME_MAY_CHANGE and getattr(cfg, f.name) != f.default]
    if given:
        raise DataError(f"--resume continues with the run's own settings (its config.json): drop {', '.join(given)} "
                        f"(only --quiet and --device may be given)")
    folder = Path(cfg.resume)
    for name in ("state.json", "config.json"):
        if not (folder / name).exists():
            raise DataError(f"cannot resume: '{folder}' has no {name} (not a run folder, or it never started)")
    saved = json.loads((folder / "config.json").read_text())
    unknown = sorted(saved.keys() - {f.name for f in dataclasses.fields(Config)})
    if unknown:  # a run started by another version of selfplay.py
        raise DataError(f"cannot resume: '{folder}/config.json' has settings this selfplay.py does not know: "
                        f"{', '.join(unknown)}")
    return Config(**dict(saved, resume=str(folder), quiet=cfg.quiet, device=cfg.device))


def open_run(cfg):
    """A new run folder, or the one to resume, with its state."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.resume:
        folder = Path(cfg.resume)
        saved = json.loads((folder / "state.json").read_text())
        unknown = sorted(saved.keys() - {f.name for f in dataclasses.fields(State)})
        if unknown:
            raise DataError(f"cannot resume: '{folder}/state.json' has fields this selfplay.py does not know: "
                            f"{', '.join(unknown)}")
        state = State(**saved)
        with open(folder / "metrics.jsonl") as f:  # drop lines of a step that never finished
            lines = f.readlines()[:state.metrics_lines]
        write_atomic(folder / "metrics.jsonl", "".join(lines))
        run = Run(cfg, folder, state, device)
        tidy(run)
        return cfg, run
    folder = Path(cfg.output or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if (folder / "state.json").exists():
        raise DataError(f"'{folder}' already holds a run: pass --resume {folder} to continue it, or another --output")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, output=str(folder))
    write_json(folder / "config.json", dataclasses.asdict(cfg))
    run = Run(cfg, folder, State(), device)
    run.save_state()
    return cfg, run


def tidy(run):
    """Removes what a killed run can leave behind: the checkpoint that state.json no longer points
    to (killed between writing its successor and deleting it), and half-written temp files."""
    current = run.dir / run.state.checkpoint if run.state.checkpoint else None
    leftovers = [f for f in (run.dir / "resume").glob("*") if f != current]
    leftovers += [*run.dir.glob("*.tmp"), *run.dir.glob("iter_*/*.tmp")]  # "*" matches dot files too
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


IMAGE_LIST = "images.txt"  # the run's readable images, one per line, relative to --images


def check_images(run, paths):
    """The run refers to its images by position (questions.jsonl, the image sampler's draws), so a
    resumed run must find the same list: it is written when the run starts (or first resumes, for a
    run folder from before the list was kept) and compared after."""
    listed = "".join(f"{os.path.relpath(p, run.cfg.images)}\n" for p in paths)
    path = run.dir / IMAGE_LIST
    if not path.exists():
        write_atomic(path, listed)
    elif path.read_text() != listed:
        before, now = set(path.read_text().splitlines()), set(listed.splitlines())
        raise DataError(f"cannot resume: the readable images under '{run.cfg.images}' are not those the run "
                        f"started with ({len(now - before)} new, {len(before - now)} gone; its list: {path}); "
                        f"restore them, or start a new run")


class Images:
    """The run's images by index, decoded when used (see data.readable_images)."""

    def __init__(self, paths, max_pixels):
        self.paths, self.max_pixels = paths, max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.max_pixels)


def record_skipped(run, skipped):
    write_atomic(run.dir / "skipped_images.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))
    if skipped and not run.cfg.quiet:
        print(f"skipped {len(skipped)} unreadable image(s), listed in {run.dir / 'skipped_images.txt'}")


# -----------------------------------------------------------------------------
# Models of a phase

def load_model(cfg, source, device, trainable):
    """A role's weights, in the dtype of grpo.weights_dtype."""
    dtype = grpo.weights_dtype(device, trainable)
    model, tokenizer, image_processor = load_vlm(source, device=device, dtype=dtype, seed=cfg.seed,
                                                 min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model.requires_grad_(trainable)
    return model, tokenizer, image_processor


# With --lora-rank, each role folder also holds the role's low-rank updates (lora.updates), from
# which the role's next phase starts: every role of a LoRA run is the base model plus its updates.
LORA_UPDATES = "lora_updates.safetensors"


def lora_updates(cfg, source):
    """The updates a LoRA role has made by `source` (Run.role_source): none at the base model."""
    if source == cfg.model:
        return {}
    if not (Path(source) / LORA_UPDATES).exists():
        raise DataError(f"cannot continue this LoRA run: '{source}' has no {LORA_UPDATES} (the role's updates)")
    return load_file(Path(source) / LORA_UPDATES)


def lora_base(cfg, device):
    """The frozen base model with adapters (lora.add_lora; the trainable parts from the seed)."""
    model, tokenizer, image_processor = load_model(cfg, cfg.model, device, trainable=False)
    lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    return model, tokenizer, image_processor


def role_weights(cfg, source, device):
    """A role as it is at `source` (Run.role_source), in the form it trains in. Full fine-tuning:
    the float32 weights of the checkpoint there. With --lora-rank r: the base model's weights,
    frozen (bf16 on a GPU), the role's updates so far as frozen factors, and a fresh adapter of
    lora.py, the only trainable part."""
    if cfg.lora_rank == 0:
        return load_model(cfg, source, device, trainable=True)
    model, tokenizer, image_processor = lora_base(cfg, device)
    lora.set_past(model, lora_updates(cfg, source))
    return model, tokenizer, image_processor


def trainable_role(cfg, source, device):
    """A role ready to train from `source` (`role_weights`), and its AdamW."""
    policy, tokenizer, image_processor = role_weights(cfg, source, device)
    if cfg.freeze_vision:
        policy.model.visual.requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable()
    optimizer = grpo.make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return policy, tokenizer, image_processor, optimizer


def start_phase(cfg, run, role):
    """The role in training, resumed at its last step if there is one, and its optimizer. A resumed
    full fine-tuning run loads the checkpointed weights; a LoRA one rebuilds the base and the
    adapters and loads the adapters' trained values."""
    checkpoint = run.dir / run.state.checkpoint if run.state.checkpoint else None
    use_lora = cfg.lora_rank > 0
    source = str(checkpoint) if checkpoint and not use_lora else run.role_source(run.state.iteration, role)
    policy, tokenizer, image_processor, optimizer = trainable_role(cfg, source, run.device)
    if checkpoint:
        if use_lora:
            lora.load_lora_state_dict(policy, torch.load(checkpoint / "lora.pt", weights_only=True,
                                                         map_location=run.device))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=run.device))
    return policy, tokenizer, image_processor, optimizer


def sampling_role(cfg, device, source, beside=None):
    """A role that only samples, as it is at `source` (Run.role_source): the checkpoint there, or
    with LoRA the base plus the updates there. `beside`: a model of this LoRA run already in memory,
    whose weights the role then shares (lora.shared_copy) instead of loading the base again."""
    if cfg.lora_rank == 0:
        return load_model(cfg, source, device, trainable=False)[0]
    if beside is None:
        beside = lora_base(cfg, device)[0]
    return lora.shared_copy(beside, lora_updates(cfg, source))


def frozen_models(cfg, run, role, policy):
    """The KL term's reference and, for the Questioner, the frozen Reasoner R_{k-1} that rewards it.

    The reference is the role at the start of the iteration (--kl-reference iteration) or the base
    model: with LoRA, when that is where the policy started, the policy itself with its adapter
    off; otherwise a frozen model, which with LoRA shares the policy's weights. Each source is
    loaded once (in iteration 1 the Questioner's reference and its Reasoner are both the base).
    Returns (reference or None, reasoner or None).
    """
    k = run.state.iteration
    loaded = {}

    def frozen(source):
        if source not in loaded:
            loaded[source] = sampling_role(cfg, run.device, source, beside=policy)
        return loaded[source]

    reference = None
    if cfg.kl_coef > 0:
        source = cfg.model if cfg.kl_reference == "base" else run.role_source(k, role)
        reference = policy if cfg.lora_rank > 0 and source == run.role_source(k, role) else frozen(source)
    reasoner = frozen(run.role_source(k, "reasoner")) if role == "questioner" else None
    return reference, reasoner


def write_role(model, tokenizer, image_processor, folder):
    """A checkpoint loadable by plain transformers (safetensors)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


def save_step(run, role, policy, tokenizer, image_processor, optimizer, step):
    """After every step: the role (or just its LoRA adapters) and its optimizer into a fresh folder,
    then state.json points at it."""
    folder = run.dir / "resume" / f"{role}_{run.state.iteration}_{step}"

    def write(tmp):
        if run.cfg.lora_rank > 0:
            torch.save(lora.lora_state_dict(policy), tmp / "lora.pt")
        else:
            write_role(policy, tokenizer, image_processor, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_folder_atomic(folder, write)
    old = run.state.checkpoint
    run.save_state(step=step, checkpoint=str(folder.relative_to(run.dir)))
    if old and run.dir / old != folder:
        shutil.rmtree(run.dir / old, ignore_errors=True)


def end_phase(run, role, policy, tokenizer, image_processor, next_phase):
    """The role's checkpoint: a plain one, and with LoRA also the updates its next phase starts from."""
    if run.cfg.lora_rank > 0:
        updates = lora.updates(policy)
        policy = lora.merge_lora(policy.float())  # in float32: a small update would round away in bf16

    def write(tmp):
        write_role(policy, tokenizer, image_processor, tmp)
        if run.cfg.lora_rank > 0:
            save_file(updates, tmp / LORA_UPDATES)
    save_folder_atomic(run.role_dir(run.state.iteration, role), write)
    old = run.state.checkpoint
    run.save_state(phase=next_phase, step=0, checkpoint="")
    if old:
        shutil.rmtree(run.dir / old, ignore_errors=True)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


# -----------------------------------------------------------------------------
# The three phases

class Stop(Exception):
    """Ctrl-C was pressed: the state on disk is complete; stop here."""


STOP_REQUESTED = []


def check_stop():
    if STOP_REQUESTED:
        raise Stop


def rollout_metrics(rollouts, step_time):
    rewards = rollouts.rewards.view(-1, rollouts.group_size)
    lengths = rollouts.mask.sum(1).float()
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "zero_var_frac": float((rewards.std(1) == 0).float().mean()) if rewards.shape[1] > 1 else 1.0,
            "completion_len": float(lengths.mean()), "step_time": step_time,
            "tokens_per_s": float(lengths.sum()) / step_time}


def reference_logprobs(cfg, policy, reference, rollouts):
    """[B, T] log-probs of the rollouts under the KL reference (None without one)."""
    if reference is None:
        return None
    with lora.adapters(policy, False) if reference is policy else contextlib.nullcontext():
        return grpo.rollout_logprobs(reference, rollouts, cfg.micro_batch_tokens, cfg.temperature)


def grpo_step(cfg, policy, optimizer, reference, rollouts):
    return grpo.update(policy, optimizer, rollouts, rollouts.advantages(cfg.advantage_scale),
                       reference_logprobs(cfg, policy, reference, rollouts),
                       temperature=cfg.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
                       minibatches=cfg.minibatches, epochs=cfg.epochs, clip_low=cfg.clip_low,
                       clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, kl_coef=cfg.kl_coef,
                       aggregation=cfg.aggregation, max_grad_norm=cfg.max_grad_norm)


def choose(run, n_items, n):
    """n distinct indices (all of them when n >= n_items), from the run's image RNG."""
    return run.image_rng.permutation(n_items)[:n].tolist()


def questioner_phase(cfg, run, paths, images):
    k = run.state.iteration
    policy, tok, ip, optimizer = start_phase(cfg, run, "questioner")
    reference, frozen_reasoner = frozen_models(cfg, run, "questioner", policy)
    question_settings = SamplingSettings(cfg.question_max_tokens, cfg.temperature, 0, cfg.top_p)
    answer_settings = SamplingSettings(cfg.answer_max_tokens, 1.0, cfg.reward_top_k, 1.0)
    reward = questioner.QuestionerRewardSettings(
        m=cfg.reward_votes, uncertainty_scale=cfg.uncertainty_scale, diversity_scope=cfg.diversity_scope,
        diversity_weight=cfg.diversity_weight, combine=cfg.reward_combine, count_empty=cfg.reward_count_empty)
    bar = tqdm(range(run.state.step, cfg.questioner_steps), desc=f"iter {k} questioner", disable=cfg.quiet,
               initial=run.state.step, total=cfg.questioner_steps)
    for step in bar:
        start = time.perf_counter()
        chosen = choose(run, len(images), cfg.images_per_step)
        rollouts, details = questioner.rollouts(policy, frozen_reasoner, tok, ip, [images[i] for i in chosen],
                                                cfg.group_size, question_settings, answer_settings, reward,
                                                run.generator, cfg.sampling_batch_tokens, cfg.question_format)
        update = grpo_step(cfg, policy, optimizer, reference, rollouts)
        record = {"phase": "questioner", "iteration": k, "step": step + 1,
                  **rollout_metrics(rollouts, time.perf_counter() - start),
                  "valid_rate": float(np.mean([d["valid"] for d in details])),
                  "confidence_mean": float(np.mean([d["confidence"] for d in details if d["valid"]] or [0.0])),
                  **update, "peak_mem_gb": peak_memory_gb(run.device)}
        run.log(record)
        save_step(run, "questioner", policy, tok, ip, optimizer, step + 1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", valid=f"{record['valid_rate']:.2f}")
        check_stop()
    end_phase(run, "questioner", policy, tok, ip, "curation")
    del policy, optimizer, reference, frozen_reasoner
    free(run.device)


def curation_phase(cfg, run, paths, images):
    """Q_k writes candidates, R_{k-1} votes; every candidate goes to iter_k/questions.jsonl."""
    k = run.state.iteration
    q_model = sampling_role(cfg, run.device, str(run.role_dir(k, "questioner")))
    r_model = sampling_role(cfg, run.device, run.role_source(k, "reasoner"), beside=q_model)
    tok, ip = load_processors(cfg.model, cfg.min_pixels, cfg.max_pixels)
    pool = choose(run, len(images), cfg.curation_images)
    write_settings = SamplingSettings(cfg.question_max_tokens, cfg.temperature, 0, cfg.curation_top_p)
    vote_settings = SamplingSettings(cfg.answer_max_tokens, cfg.temperature, 0, cfg.top_p)
    records = []
    per_batch = max(1, cfg.images_per_step)
    bar = tqdm(range(0, len(pool), per_batch), desc=f"iter {k} curation", disable=cfg.quiet)
    for start in bar:
        batch = pool[start:start + per_batch]
        batch_images = {i: images[i] for i in batch}  # decoded once, asked about N times
        _, _, texts, parsed = questioner.write_questions(q_model, tok, ip, list(batch_images.values()),
                                                         cfg.candidates_per_image, write_settings, run.generator,
                                                         cfg.sampling_batch_tokens, cfg.question_format)
        owners = [batch[j // cfg.candidates_per_image] for j in range(len(texts))]
        asked = [j for j, p in enumerate(parsed) if p is not None]
        responses, answers = reasoner.answer(
            r_model, tok, ip, [batch_images[owners[j]] for j in asked], [parsed[j]["question"] for j in asked],
            cfg.curation_votes, vote_settings, run.generator, cfg.sampling_batch_tokens) if asked else ([], [])
        votes = dict(zip(asked, zip(responses, answers, reasoner.curate(answers, cfg.tau_low, cfg.tau_high,
                                                                        cfg.curation_count_empty))))
        for j, (text, p) in enumerate(zip(texts, parsed)):
            group_responses, group_answers, verdict = votes.get(j, ([], [], {"silver": None, "confidence": 0.0,
                                                                             "kept": False}))
            records.append({"image": paths[owners[j]], "image_index": owners[j],
                            "question": p["question"] if p else None, "raw": text, "valid": p is not None,
                            "answers": group_answers, "responses": group_responses, **verdict})
        bar.set_postfix(kept=sum(r["kept"] for r in records), of=len(records))
    (run.dir / f"iter_{k}").mkdir(exist_ok=True)
    write_atomic(run.dir / f"iter_{k}" / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    confidences = [r["confidence"] for r in records if r["valid"]]
    kept = sum(r["kept"] for r in records)
    run.log({"phase": "curation", "iteration": k, "n_candidates": len(records), "n_valid": len(confidences),
             "n_kept": kept, "kept_frac": kept / max(len(records), 1),
             "confidence_mean": float(np.mean(confidences)) if confidences else None,
             "confidence_hist": np.histogram(confidences, bins=10, range=(0, 1))[0].tolist()})
    run.save_state(phase="reasoner", step=0, checkpoint="")
    del q_model, r_model
    free(run.device)


def reasoner_phase(cfg, run, paths, images):
    k = run.state.iteration
    kept = [r for r in map(json.loads, open(run.dir / f"iter_{k}" / "questions.jsonl")) if r["kept"]]
    if len(kept) < cfg.questions_per_step:
        message = (f"iteration {k}: curation kept {len(kept)} question(s), fewer than one Reasoner batch "
                   f"(--questions-per-step {cfg.questions_per_step})")
        if cfg.on_too_few == "stop":
            raise DataError(message + "; stopping (--on-too-few stop)")
        print(message + f"; skipping the Reasoner phase, R_{k} = R_{k - 1} (--on-too-few skip)")
        # Loaded as for training (float32 weights, or the base with float32 LoRA updates), so the
        # copy loses no precision; the fresh, untrained adapter adds nothing.
        model, tok, ip = role_weights(cfg, run.role_source(k, "reasoner"), run.device)
        end_phase(run, "reasoner", model, tok, ip, "summary")
        return
    policy, tok, ip, optimizer = start_phase(cfg, run, "reasoner")
    reference, _ = frozen_models(cfg, run, "reasoner", policy)
    settings = SamplingSettings(cfg.answer_max_tokens, cfg.temperature, 0, cfg.top_p)
    bar = tqdm(range(run.state.step, cfg.reasoner_steps), desc=f"iter {k} reasoner", disable=cfg.quiet,
               initial=run.state.step, total=cfg.reasoner_steps)
    for step in bar:
        start = time.perf_counter()
        chosen = [kept[i] for i in choose(run, len(kept), cfg.questions_per_step)]
        rollouts, _ = reasoner.rollouts(policy, tok, ip, [images[r["image_index"]] for r in chosen],
                                        [r["question"] for r in chosen], [r["silver"] for r in chosen],
                                        cfg.group_size, settings, run.generator, cfg.sampling_batch_tokens,
                                        cfg.reasoner_reward)
        update = grpo_step(cfg, policy, optimizer, reference, rollouts)
        record = {"phase": "reasoner", "iteration": k, "step": step + 1,
                  **rollout_metrics(rollouts, time.perf_counter() - start), **update,
                  "peak_mem_gb": peak_memory_gb(run.device)}
        run.log(record)
        save_step(run, "reasoner", policy, tok, ip, optimizer, step + 1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        check_stop()
    end_phase(run, "reasoner", policy, tok, ip, "summary")
    del policy, optimizer, reference
    free(run.device)


def summarise(run):
    """One line per iteration, printed and logged."""
    k = run.state.iteration
    lines = [json.loads(line) for line in open(run.dir / "metrics.jsonl")]
    mine = [m for m in lines if m.get("iteration") == k]

    def mean_of(phase, key):
        values = [m[key] for m in mine if m["phase"] == phase and m.get(key) is not None]
        return float(np.mean(values)) if values else None

    curation = next((m for m in mine if m["phase"] == "curation"), {})
    summary = {"phase": "summary", "iteration": k,
               "questioner_reward": mean_of("questioner", "reward_mean"),
               "valid_rate": mean_of("questioner", "valid_rate"),
               "n_kept": curation.get("n_kept"), "kept_frac": curation.get("kept_frac"),
               "confidence_mean": curation.get("confidence_mean"),
               "reasoner_reward": mean_of("reasoner", "reward_mean")}
    run.log(summary)
    shown = " ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in summary.items() if key not in ("phase",))
    print(f"[summary] {shown}")
    done = k == run.cfg.iterations
    run.save_state(iteration=k if done else k + 1, phase="done" if done else "questioner", step=0)


PHASES = {"questioner": questioner_phase, "curation": curation_phase, "reasoner": reasoner_phase}


def train(cfg, run, paths, images):
    while run.state.phase != "done":
        phase, k, first_step = run.state.phase, run.state.iteration, run.state.step
        reset_peak_memory(run.device)
        start = time.perf_counter()
        if phase == "summary":
            summarise(run)
        else:
            PHASES[phase](cfg, run, paths, images)
        # Wall time and peak memory of each phase as run (a resumed phase: from first_step on). Kept
        # apart from metrics.jsonl, which must be identical for a resumed and an uninterrupted run.
        append_jsonl(run.dir / "phase_times.jsonl", {
            "iteration": k, "phase": phase, "from_step": first_step, "seconds": time.perf_counter() - start,
            "peak_mem_gb": peak_memory_gb(run.device)})
        try:
            write_report(run.dir)
        except Exception as err:  # the report is a view of the run's files: never a reason to stop training
            print(f"warning: report.html not updated ({type(err).__name__}: {err}); "
                  f"`python report.py {run.dir}` rebuilds it", file=sys.stderr)
        check_stop()  # a Ctrl-C during curation or a summary lands here, after its state is saved
    print(f"done: {run.dir} (report: {run.dir / 'report.html'})")


def main(argv=None):
    cfg = parse(Config, argv, __doc__.split("\n\n")[0])
    if not cfg.images and not cfg.resume:
        print("error: --images is required (or --resume a run folder)", file=sys.stderr)
        return 2
    transformers.utils.logging.disable_progress_bar()  # our own bars say what is going on
    signal.signal(signal.SIGINT, _on_interrupt)
    try:
        cfg = resolve_config(cfg)
        check_bounds(cfg)
        paths, skipped = readable_images(cfg.images, max_pixels=cfg.max_pixels)
        cfg, run = open_run(cfg)
        check_images(run, paths)
        record_skipped(run, skipped)
        train(cfg, run, [str(p) for p in paths], Images(paths, cfg.max_pixels))
    except (DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (Stop, KeyboardInterrupt):
        print(f"stopped; continue with: python selfplay.py --resume {cfg.resume or cfg.output}", file=sys.stderr)
        return 130
    return 0


def _on_interrupt(signum, frame):
    if STOP_REQUESTED:  # second Ctrl-C: stop now, the last finished step is on disk
        raise KeyboardInterrupt
    STOP_REQUESTED.append(True)
    print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
