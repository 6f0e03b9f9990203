"""VisPlay self-play from one command: a Questioner and a Reasoner, both grown from one base VLM,
take turns for K iterations on a folder of unlabeled images (METHOD.md, section 7, (23)-(25)).

    python selfplay.py --images dir/ [--model Qwen/Qwen2.5-VL-3B-Instruct] [--output runs/name]
    python selfplay.py --resume runs/name [--iterations K]

Iteration k = 1..K:
  1. Questioner phase (23): Q_k starts from Q_{k-1} (Q_0 = base) and is trained with GRPO (14)-(22);
     its reward (4)-(10) comes from the frozen Reasoner R_{k-1} (R_0 = base) answering each question
     m times.
  2. Curation (24): Q_k writes N questions per image of the curation pool (1); R_{k-1} answers each
     m times (2)-(4); the majority answer is the silver label, and questions with confidence in
     [τ_low, τ_high] are kept (11).
  3. Reasoner phase (25): R_k starts from R_{k-1} and is trained with GRPO on the kept triples,
     rewarded by (12).
The KL term (18)-(19) of each phase pulls the role toward its weights at the start of the
iteration (`kl_reference = "iteration"`, Q_{k-1} or R_{k-1}) or toward the base model ("base").

This file is the loop, where the machinery is wired in: the run folder (state, atomic files,
resume, Ctrl-C) is machinery/runfolder.py, which also hands each step its prompts as a Batch
(machinery/batch.py: this process's share of them, their random streams); the roles' weights (full
fine-tuning or LoRA, AdamW, frozen models, the GRPO step) machinery/policies.py.
Everything lands in the run folder: config.json, metrics.jsonl, iter_k/questions.jsonl (every
curation candidate), iter_k/{questioner,reasoner}_episodes.jsonl (every training rollout),
iter_k/{questioner,reasoner}/ (save_pretrained), state.json and report.html. A killed run resumes
from its last finished step and ends bitwise equal to an uninterrupted one on CPU.

Left out: the validation benchmark during training (run evaluate.py on the checkpoints), and
learning-rate schedules (the lr is constant, (22)).
"""

import json
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers

import grpo
import questioner
import reasoner
from data import SCENES_FILE, DataError, grade_candidates, null_labels, oracle_labels, readable_images
from model import ModelError, load_processors, resolve_device
from rewards import reasoner_reward
from machinery import distributed as dist
from machinery.cli import AT_LEAST_1, AT_LEAST_2, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, option, parse_given
from machinery.policies import (Trainee, as_sampler, frozen_models, resolve_pixel_bounds, role_weights, sampling_role,
                                sampling_settings, save_role)
from machinery.runfolder import (Images, Stop, WriteFailed, discard_if_unstarted, new_run, record_skipped,
                                 resolve_config, resumed_run, stop_after_step_on_ctrl_c, write_failure)


@dataclass
class Config:
    # run
    images: str = option("folder of unlabeled images (searched recursively)", "run", default="")
    output: str = option("run folder (default: runs/<date>-<time>)", "run", default="")
    resume: str = option("continue the run in this folder, with its saved config", "run", default="")
    model: str = option("hub id, local folder, 'tiny' (offline) or 'random-3b'", "run",
                        default="Qwen/Qwen2.5-VL-3B-Instruct")
    device: str = option("cuda, cpu, or auto", "run", default="auto")
    seed: int = option("seeds sampling, image choice and the presets' random weights", "run", valid=NON_NEGATIVE,
                       default=0)
    quiet: bool = option("no progress bars (for logs)", "run", default=False)
    threads: int = option("torch threads on CPU (0: torch's choice; on a busy machine 1 can be the fastest)", "run",
                          valid=NON_NEGATIVE, default=0)
    print_config: bool = option("print the settings as JSON and exit (bench.py reads them)", "run", default=False)
    # loop
    iterations: int = option("self-play iterations K", "loop", valid=AT_LEAST_1, default=3)
    questioner_steps: int = option("GRPO steps of the Questioner per iteration", "loop", valid=NON_NEGATIVE, default=20)
    reasoner_steps: int = option("GRPO steps of the Reasoner per iteration", "loop", valid=NON_NEGATIVE, default=20)
    group_size: int = option("G: samples per prompt in both roles' rollouts", "loop", valid=AT_LEAST_2, default=8)
    min_pixels: int = option("images are resized to at least this many pixels (0: the model's own bound; the "
                             "paper's is 262144)", "loop", valid=NON_NEGATIVE, default=0)
    max_pixels: int = option("... and at most this many (0: the model's own, at most the paper's 4194304)", "loop",
                             valid=NON_NEGATIVE, default=0)
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
    vote_temperature: float = option("temperature of the Reasoner's votes, for this reward and in curation (the "
                                     "public code's)", "questioner", valid=NON_NEGATIVE, default=1.0)
    vote_top_k: int = option("top-k of those votes (the public code's; 0: off)", "questioner", valid=NON_NEGATIVE,
                             default=40)
    uncertainty_scale: str = option("'paper': 1 - |2c - 1|; 'code': min(c, 1 - c); 'none': 1 for every valid "
                                    "question (an ablation: no difficulty reward)", "questioner",
                                    choices=("paper", "code", "none"), default="paper")
    diversity_scope: str = option("'group': cluster within an image's G questions; 'batch': whole batch",
                                  "questioner", choices=("group", "batch"), default="group")
    diversity_weight: float = option("λ of the diversity penalty", "questioner", valid=NON_NEGATIVE, default=1.0)
    diversity_bleu: str = option("BLEU distance of two questions: 'symmetric': 1 - the mean of both directions; "
                                 "'one-sided': 1 - BLEU(reference = the later, hypothesis = the earlier) (public "
                                 "code)", "questioner", choices=("symmetric", "one-sided"), default="symmetric")
    diversity_invalid: str = option("an invalid output in the diversity clustering: 'raw': its text; 'empty': an "
                                    "empty string, a cluster of its own (public code)", "questioner",
                                    choices=("raw", "empty"), default="raw")
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
    curation_count_empty: bool = option("answers without \\boxed{} vote for 'None' in the confidence (public "
                                        "code; empty boxes are dropped)", "curation", default=False)
    silver_labels: str = option("'majority': the vote's answer (the method). Controls, labels no vote chose: "
                                "'random': one of the distinct answers at random; 'oracle': the true answer; "
                                "'null': uniform over the category's answers (oracle and null: shapes-world "
                                "folders, whose answers are known)", "curation",
                                choices=("majority", "random", "oracle", "null"), default="majority")
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
    fsdp: bool = option("shard the trained role over torchrun's processes (full fine-tuning)", "grpo", default=False)
    freeze_vision: bool = option("train the language model only (the paper trains the vision tower too)", "grpo",
                                 default=False)
    lora_rank: int = option("train LoRA adapters of this rank instead of all weights (0: full fine-tuning)",
                            "grpo", valid=NON_NEGATIVE, default=0)
    lora_alpha: float = option("LoRA scale α (the update is α / r · B A); LoRA wants a larger --lr than 1e-6",
                               "grpo", valid=POSITIVE, default=32.0)
    max_grad_norm: float = option("gradient-norm clip", "grpo", valid=POSITIVE, default=1.0)


# -----------------------------------------------------------------------------
# The method's settings, from the config

def questioner_reward_settings(cfg):
    """How the Questioner is rewarded: the frozen Reasoner's m votes, and the paper-vs-code switches."""
    return questioner.QuestionerRewardSettings(
        vote=reasoner.Vote(m=cfg.reward_votes, sampling=sampling_settings(cfg).vote,
                           count_empty=cfg.reward_count_empty),
        uncertainty_scale=cfg.uncertainty_scale, diversity_scope=cfg.diversity_scope,
        diversity_weight=cfg.diversity_weight, combine=cfg.reward_combine, diversity_bleu=cfg.diversity_bleu,
        diversity_invalid=cfg.diversity_invalid)


def curation_vote(cfg):
    """How the frozen Reasoner votes in curation (reasoner.curate never counts an empty box)."""
    return reasoner.Vote(m=cfg.curation_votes, sampling=sampling_settings(cfg).vote,
                         count_empty=cfg.curation_count_empty)


# -----------------------------------------------------------------------------
# The three phases of an iteration. A role is where its weights are (the base model's id, or its
# folder in the run): each phase takes the roles it needs and hands back the one it made.

def train_questioner(cfg, run, Q, R, images):
    """Q_k: GRPO from Q_{k-1} on G questions per image, each rewarded by how unsure the frozen
    Reasoner R_{k-1} is of it and how little it repeats the others (METHOD.md, (23), reward (4)-(10))."""
    trainee = Trainee(cfg, Q, run.device, run.checkpoint())
    reference, frozen_reasoner = frozen_models(cfg, trainee.model, Q, R)
    reward = partial(questioner.score_questions, as_sampler(cfg, frozen_reasoner, trainee.processors),
                     reward=questioner_reward_settings(cfg))
    settings = sampling_settings(cfg).question
    for batch in run.batches("questioner", cfg.questioner_steps, range(len(images)), cfg.images_per_step, images):
        rollouts, episodes = questioner.rollouts(trainee.sampler, batch, reward, G=cfg.group_size, settings=settings,
                                                 fmt=cfg.question_format)
        episodes = batch.gather(episodes, per=cfg.group_size)
        metrics = trainee.grpo_step(rollouts, reference, batch)
        metrics["valid_rate"] = float(np.mean([e["valid"] for e in episodes]))
        metrics["confidence_mean"] = float(np.mean([e["confidence"] for e in episodes if e["valid"]] or [0.0]))
        run.end_step(metrics, episodes, trainee.save_checkpoint)
    run.save_role("questioner", trainee.save_role)


def curate(cfg, run, Q, R, images):
    """Q_k writes N candidates per image of the pool, R_{k-1} votes m times on each, and the
    confidence band keeps the questions the Reasoner will train on (METHOD.md, (24) and (11)).
    Every candidate goes to iter_k/questions.jsonl."""
    questioner_model = sampling_role(cfg, run.device, Q)
    processors = load_processors(cfg.model, cfg.min_pixels, cfg.max_pixels)
    writer = as_sampler(cfg, questioner_model, processors)  # Q_k
    voter = as_sampler(cfg, sampling_role(cfg, run.device, R, beside=questioner_model), processors)  # R_{k-1}
    pool, N, records = run.pool(images, cfg.curation_images), cfg.candidates_per_image, []
    settings, vote = sampling_settings(cfg).candidate, curation_vote(cfg)
    for chunk in run.progress(pool.chunks(cfg.images_per_step), "curation"):
        _, _, texts, parsed = questioner.write_questions(writer, chunk.images, chunk.keys("candidates"), n=N,
                                                         settings=settings, fmt=cfg.question_format)
        votes = reasoner.curate(voter, chunk, texts, parsed, vote=vote, band=(cfg.tau_low, cfg.tau_high))
        records += [{"image": chunk.paths[j // N], "image_index": chunk.items[j // N], **v}
                    for j, v in enumerate(votes)]
        run.bar.set_postfix(kept=sum(r["kept"] for r in records), of=len(records))
    records = pool.gather(records, per=N)
    grade_candidates(records, images.scenes)  # shapes-world images only: each one's true answer and category
    if cfg.silver_labels != "majority":  # a control: labels that no vote chose
        relabel = {"random": lambda: reasoner.random_silver_labels(records, run.image_rng),
                   "oracle": lambda: oracle_labels(records),
                   "null": lambda: null_labels(records, images.scenes, run.image_rng)}
        relabel[cfg.silver_labels]()
    grades = grade_candidates(records, images.scenes)  # how often the labels trained on are right
    run.save_questions(records)
    confidences = [r["confidence"] for r in records if r["valid"]]
    kept = sum(r["kept"] for r in records)
    run.log({"phase": "curation", "iteration": run.state.iteration, "n_candidates": len(records),
             "n_valid": len(confidences), "n_kept": kept, "kept_frac": kept / max(len(records), 1),
             "confidence_mean": float(np.mean(confidences)) if confidences else None,
             "confidence_hist": np.histogram(confidences, bins=10, range=(0, 1))[0].tolist(), **grades})


def train_reasoner(cfg, run, R, kept, images):
    """R_k: GRPO from R_{k-1} on G answers per kept question, each rewarded for matching its silver
    label (METHOD.md, (25) with the reward (12))."""
    k = run.state.iteration
    if len(kept) < cfg.questions_per_step:
        message = (f"iteration {k}: curation kept {len(kept)} question(s), fewer than one Reasoner batch "
                   f"(--questions-per-step {cfg.questions_per_step})")
        if cfg.on_too_few == "stop":
            raise DataError(message + "; stopping (--on-too-few stop)")
        print(message + f"; skipping the Reasoner phase, R_{k} = R_{k - 1} (--on-too-few skip)")
        # Loaded as for training (float32 weights, or the base with float32 LoRA updates), so the
        # copy loses no precision; the fresh, untrained adapter adds nothing.
        model, processors = role_weights(cfg, R, run.device)
        run.save_role("reasoner", lambda folder: save_role(cfg, model, processors, folder))
        return
    trainee = Trainee(cfg, R, run.device, run.checkpoint())
    reference, _ = frozen_models(cfg, trainee.model, R)
    reward, settings = partial(reasoner_reward, mode=cfg.reasoner_reward), sampling_settings(cfg).answer
    for batch in run.batches("reasoner", cfg.reasoner_steps, kept, cfg.questions_per_step, images,
                             index=lambda record: record["image_index"]):
        rollouts, episodes = reasoner.rollouts(trainee.sampler, batch, reward, G=cfg.group_size, settings=settings)
        metrics = trainee.grpo_step(rollouts, reference, batch)
        run.end_step(metrics, batch.gather(episodes), trainee.save_checkpoint)
    run.save_role("reasoner", trainee.save_role)


def summarise(cfg, run):
    """One line per iteration, printed and logged."""
    k = run.state.iteration
    mine = [m for m in run.metrics() if m.get("iteration") == k]

    def mean_of(phase, key):
        values = [m[key] for m in mine if m["phase"] == phase and m.get(key) is not None]
        return float(np.mean(values)) if values else None

    curation = next((m for m in mine if m["phase"] == "curation"), {})
    summary = {"phase": "summary", "iteration": k,
               "questioner_reward": mean_of("questioner", "reward_mean"),
               "valid_rate": mean_of("questioner", "valid_rate"),
               "n_kept": curation.get("n_kept"), "kept_frac": curation.get("kept_frac"),
               "confidence_mean": curation.get("confidence_mean"), "silver_accuracy": curation.get("silver_accuracy"),
               "reasoner_reward": mean_of("reasoner", "reward_mean")}
    run.log(summary)
    print("[summary] " + " ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                                  for key, value in summary.items() if key != "phase"))


# -----------------------------------------------------------------------------
# The loop

def train(cfg, run, images):
    """K iterations of the three phases, in the paper's order, the roles handed from phase to
    phase. run.phase runs a phase and moves the state on; a resumed run starts at its iteration,
    where run.phase hands back what the phases it has finished left."""
    Q, R = run.roles()  # Q_{k-1}, R_{k-1}: the base model when k = 1
    for k in run.iterations():
        Q = run.phase("questioner", train_questioner, cfg, run, Q, R, images)  # Q_k from Q_{k-1}, rewarded by R_{k-1}
        kept = run.phase("curation", curate, cfg, run, Q, R, images)  # Q_k asks, R_{k-1} votes: silver labels
        R = run.phase("reasoner", train_reasoner, cfg, run, R, kept, images)  # R_k from R_{k-1}, on the kept
        run.phase("summary", summarise, cfg, run)
    print(f"done: {run.dir} ({cfg.iterations} iterations; report: {run.dir / 'report.html'})")


def check_bounds(cfg):
    """Pairs of settings where one bounds the other (each alone is checked by its flag)."""
    for low, high in (("tau_low", "tau_high"), ("min_pixels", "max_pixels")):
        if getattr(cfg, low) > getattr(cfg, high):
            flag = {name: "--" + name.replace("_", "-") for name in (low, high)}
            raise DataError(f"{flag[low]} {getattr(cfg, low)} is above {flag[high]} {getattr(cfg, high)}")


def main(argv=None):
    cfg, given = parse_given(Config, argv, __doc__.split("\n\n")[0])
    transformers.utils.logging.disable_progress_bar()  # our own bars say what is going on
    stop_after_step_on_ctrl_c()
    run = None
    try:
        # Every check that can fail runs before the run folder is written, so a corrected command
        # is never refused for a folder that a failed one left behind.
        cfg = resolve_pixel_bounds(resolve_config(Config, cfg, given))  # loads the model's processors
        check_bounds(cfg)
        if cfg.print_config:
            print(json.dumps(asdict(cfg), indent=2))
            return 0
        if not cfg.images:
            raise DataError("--images is required (or --resume a run folder)")
        if cfg.silver_labels in ("oracle", "null") and not (Path(cfg.images) / SCENES_FILE).is_file():
            raise DataError(f"--silver-labels {cfg.silver_labels} needs the true answers: a folder written by "
                            f"data.write_shapes_folder (with {SCENES_FILE}); '{cfg.images}' has none")
        device = dist.init(resolve_device(cfg.device), min(cfg.images_per_step, cfg.questions_per_step))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        paths, skipped = readable_images(cfg.images, max_pixels=cfg.max_pixels)
        cfg, run = resumed_run(cfg, device, paths) if cfg.resume else new_run(cfg, device, paths)
        record_skipped(run, skipped)
        if run.state.iteration > cfg.iterations:
            print(f"'{run.dir}' has finished its {cfg.iterations} iterations; pass --iterations with more to go on")
            return 0
        train(cfg, run, Images(cfg.images, paths, cfg.max_pixels))
        dist.close(together=True)
    except (DataError, ModelError) as err:
        if run is not None and not cfg.resume:
            discard_if_unstarted(run)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WriteFailed as err:
        print(f"error: {write_failure(err, run)}", file=sys.stderr)
        return 1
    except (Stop, KeyboardInterrupt):
        print(f"stopped; continue with: python selfplay.py --resume {cfg.resume or cfg.output}", file=sys.stderr)
        return 130
    finally:
        if run is not None:
            run.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
