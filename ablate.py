"""Ablations in one command: which part of VisPlay makes its gain, measured over seeds on one
held-out benchmark, every arm against the method on the same questions.

    python ablate.py OUT                      # 8 arms x 3 seeds, 3 iterations, 500 questions
    python ablate.py OUT --quick              # the same arms, 2 seeds, fewer steps and questions
    python ablate.py OUT --arms method,null_labels --seeds 5 --base-seeds 2
    python ablate.py OUT --world three        # the same arms without spatial and size questions
    python ablate.py OUT --world counting     # the same arms in the counting world

An arm is a preset in presets/ablation/ (ARM.toml): the self-play settings that take one part
of the method away, stacked on the settings every arm shares (presets/ablate.toml, and
presets/ablate_quick.toml with --quick). A new arm is a new file; `--arms` names the files.

What happens, each step skipped where its output is already in OUT, so the same command run
again finishes what a killed one left:
1. The base: a small Qwen2.5-VL pretrained on a shapes world (tools/pretrain.py with the
   world's flags, WORLDS). The five-category world (the default) has a planted skew: its
   Reasoner is taught to check the image on colour, spatial and size questions but mostly to
   guess on counting and arithmetic ones (the hasty habit, where the vote knows more than greedy
   decoding), and its Questioner to ask the first three most of the time. So the difficulty
   reward would have a frontier to find and the diversity reward a coverage to keep. (Measured,
   the shipped base learnt the checks on colour only: on spatial and size questions it is at
   chance, and most of its questions have no answer, so its silver labels are mostly wrong;
   RESULTS.md.) The three-category world (--world three) is the same without spatial and size:
   its base checks colour questions (95% right) and guesses on counting and arithmetic, and its
   Questioner asks colour questions most of the time. The counting world (--world counting, the
   first run's base) asks counting questions only, all with the hasty habit: every question has
   an answer and the vote is mostly right, so the label arms can show what the labels carry,
   while the Questioner has little to find. Base seed 0 is the world's shipped base
   (examples/shapes5_base, examples/shapes3_base, examples/shapes_base: the world's flags at
   seed 0); --base-seeds N pretrains seeds 1..N-1 into OUT/bases/.
2. Per base, unlabeled images for self-play; one held-out benchmark balanced over the world's
   categories, on scenes of another random stream (never trained on, never tuned on).
3. Self-play, every arm x seed x base: selfplay.py with the stacked presets, --jobs runs at a
   time (one torch thread each on CPU, one GPU each with --device cuda), the longest first; a
   killed run resumes. The scripts run in --jobs worker processes that import torch and
   transformers once. An arm that is another stopped early (`shortened`: one_iteration is the
   method's first iteration) is not trained again.
4. evaluate.py on each run's last Reasoner and on the base: greedy accuracy, pass@1 and maj@m of
   m samples at temperature 1, and the greedy accuracy of the same questions shown other images
   (blind; no samples there, the table shows none); on the Reasoners of the earlier iterations
   greedy accuracy alone, the curve.
5. OUT/ablation.md (the tables), OUT/ablation.json and OUT/ablation.html (the plot): per arm the
   mean over runs with a 95% interval, and its paired difference to `method`, from a bootstrap
   that resamples runs and questions together (`bootstrap`). From each run's metrics: how often
   curation's silver labels were right, how many questions it kept, and the category mix of the
   Questioner's questions per iteration (what the Questioner changed).

How to read it: an arm below the method, its paired interval excluding 0, is a part the gain
needs; `oracle_labels` (the true answers) is the ceiling and `null_labels` (random answers of
the right kind) the floor, both measured, not assumed.
"""

import concurrent.futures
import contextlib
import importlib
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

import data
from evaluate import safe_name
from machinery.cli import AT_LEAST_1, option, parse, progress, read_preset
from tools import ablation_page, pretrain

REPO = Path(__file__).resolve().parent
ARMS = REPO / "presets" / "ablation"
TRAIN_STREAM, BENCH_STREAM = 10_000, 20_000  # image streams that never meet pretraining's or each other


@dataclass(frozen=True)
class World:
    """A shapes world a table is measured in: its base of seed 0, shipped, and the tools/pretrain.py
    flags that made it (and make the bases of the other seeds)."""
    base: Path
    flags: tuple


WORLDS = {
    # the five categories and the planted skew of step 1 of the docstring: the Questioner's parts
    # have a frontier to find and a coverage to keep
    "five": World(REPO / "examples" / "shapes5_base",
                  ("--categories", "counting,colour,spatial,size,arithmetic", "--two-sizes", "--guess-categories",
                   "counting,arithmetic", "--questioner-skew", "0.8", "--eval-questions", "200")),
    # the five without spatial and size, which no base of this size learnt to look at (RESULTS.md):
    # the Reasoner checks on colour and guesses on counting and arithmetic, the Questioner asks
    # colour questions most of the time
    "three": World(REPO / "examples" / "shapes3_base",
                   ("--categories", "counting,colour,arithmetic", "--guess-categories", "counting,arithmetic",
                    "--questioner-skew", "0.8", "--steps", "2000", "--guess-steps", "500", "--eval-questions", "500")),
    # counting questions only, the hasty habit on all of them (the first run's base): every question
    # has an answer and the vote is mostly right, so the labels' parts show; the Questioner has
    # little to find
    "counting": World(REPO / "examples" / "shapes_base", ("--steps", "400", "--guess-steps", "100",
                                                          "--eval-questions", "0")),
}


@dataclass
class Config:
    out: str = option("folder for everything the ablation writes (or the first argument); the same command "
                      "again finishes a killed one")
    quick: bool = option("fewer steps and questions, 2 seeds: a few minutes on 2 CPU cores", default=False)
    world: str = option("five: five categories and a planted skew (the Questioner's parts); three: the same "
                        "without spatial and size; counting: counting questions only, mostly right votes (the "
                        "labels' parts)", choices=tuple(WORLDS), default="five")
    arms: str = option("comma-separated arms, files of presets/ablation/ (default: all; `method` is always run)",
                       default="")
    seeds: int = option("self-play seeds per arm (default 3, 2 with --quick)", valid=AT_LEAST_1, default=None)
    base_seeds: int = option("bases pretrained from seeds 0..N-1, each with every arm and seed", valid=AT_LEAST_1,
                             default=1)
    jobs: int = option("runs at a time (default: the CPU cores, or the GPUs with --device cuda)", valid=AT_LEAST_1,
                       default=None)
    device: str = option("cpu or cuda", choices=("cpu", "cuda"), default="cpu")
    bootstrap: int = option("bootstrap resamples for the intervals", valid=AT_LEAST_1, default=4000)


@dataclass(frozen=True)
class Plan:
    """How much one table measures: FULL, or QUICK (--quick)."""
    presets: tuple = ("presets/ablate.toml",)  # the self-play settings every arm stacks on
    seeds: int = 3
    train_images: int = 256
    held_out: int = 500  # questions of the benchmark, balanced over the world's categories
    samples: int = 8  # m of pass@1 and maj@m
    world: str = "five"  # a key of WORLDS


FULL = Plan()
QUICK = Plan(presets=("presets/ablate.toml", "presets/ablate_quick.toml"), seeds=2, train_images=128, held_out=100,
             samples=4)


@dataclass(frozen=True)
class Run:
    arm: str
    seed: int
    base_seed: int
    source: str = ""  # the arm whose run this one is, stopped after `iterations` (see `shortened`)
    iterations: int = 0

    @property
    def name(self):
        return f"{self.arm}/seed_{self.seed}" + (f"-base_{self.base_seed}" if self.base_seed else "")

    @property
    def trained(self):
        """The run whose folder holds this one's Reasoners: itself, or its source's run."""
        return replace(self, arm=self.source, source="", iterations=0) if self.source else self


def settings(plan, arm=None):
    """The settings a run of `arm` gets from its preset files, later files over earlier ones as
    selfplay.py stacks them, or with arm None those every arm shares (the shared presets set
    `iterations`). DataError in one line on a file that cannot be read."""
    stacked = {}
    for path in [REPO / p for p in plan.presets] + ([ARMS / f"{arm}.toml"] if arm else []):
        try:
            stacked |= read_preset(path)
        except ValueError as err:
            raise data.DataError(str(err)) from None
    return stacked


def shortened(stacked):
    """stacked: {arm: its settings} -> {arm: (source, iterations)} for each arm whose settings are
    another's but for fewer iterations: its runs are that arm's runs stopped early. Self-play's
    iteration k does not depend on how many iterations follow (a finished run resumed with more
    goes on the same way; the method's first iteration and `one_iteration`'s Reasoner were the same
    byte for byte), so such an arm is not trained again: its Reasoners are its source's first ones."""
    rest = lambda arm: {k: v for k, v in stacked[arm].items() if k != "iterations"}
    found = {}
    for arm in stacked:
        longer = [o for o in stacked if rest(o) == rest(arm) and stacked[o]["iterations"] > stacked[arm]["iterations"]]
        if longer:
            found[arm] = (max(longer, key=lambda o: stacked[o]["iterations"]), stacked[arm]["iterations"])
    return found


# -----------------------------------------------------------------------------
# Running the scripts: in --jobs worker processes, each importing them once

def start_worker(slots, device):
    """A worker's set-up: one torch thread on CPU, its own GPU (a slot) on CUDA. Ctrl-C is the
    parent's to handle (it stops the workers, and a killed run resumes); selfplay.py still stops
    after its step when it sees one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir(REPO)  # where the scripts' relative paths (the presets) start
    slot = slots.get()
    if device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # before this process first touches CUDA
    else:
        import torch
        torch.set_num_threads(1)


def script(args, log):
    """Runs a script of the repo (its main) in this process, its output into `log`; True if it
    exited 0. A worker imports torch and transformers once for all its scripts: a new process
    per script would spend ~7 s importing them each time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(Path(args[0]).with_suffix("").as_posix().replace("/", "."))
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)  # and what C code prints (torch's warnings)
        try:
            code = module.main([str(a) for a in args[1:]])
        except SystemExit as stop:
            code = stop.code
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            f.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
    return code in (0, None)


def base_folder(plan, out, base_seed):
    return WORLDS[plan.world].base if base_seed == 0 else out / "bases" / f"seed_{base_seed}"


def make_base(plan, out, base_seed):
    """Pretrains the base of base_seed unless it is there (pretrain.py writes its config last):
    None, or what failed. A worker's task."""
    folder, log = base_folder(plan, out, base_seed), out / "logs" / f"pretrain_{base_seed}.log"
    flags = WORLDS[plan.world].flags
    if (folder / pretrain.CONFIG_FILE).is_file() or \
            script(["tools/pretrain.py", "--output", folder, "--seed", base_seed, "--quiet", *flags], log):
        return None
    return f"pretraining base seed {base_seed} failed; see {log}"


def make_images(out, plan, base_seed):
    """The unlabeled self-play images of a base; write_shapes_folder writes scenes.jsonl last."""
    folder = out / "images" / f"base_{base_seed}"
    if not (folder / data.SCENES_FILE).is_file():
        world = pretrain.load_config(base_folder(plan, out, base_seed)).world()
        data.write_shapes_folder(folder, plan.train_images, seed=TRAIN_STREAM + base_seed, **world)
    return folder


def make_benchmark(out, plan):
    """The held-out questions as evaluate.py's JSONL, balanced over the world's categories."""
    if not (out / "bench" / "heldout.jsonl").is_file():
        base = pretrain.load_config(WORLDS[plan.world].base)
        data.write_benchmark(out / "bench", plan.held_out, seed=BENCH_STREAM, categories=base.categories.split(","),
                             **base.world())


def reasoners(out, run):
    """The Reasoner of every iteration a run has finished, in iteration order: a shortened run's
    are its source's first ones."""
    found = sorted((out / "runs" / run.trained.name).glob("iter_*/reasoner"), key=lambda p: int(p.parent.name[5:]))
    return found[:run.iterations or None]


def evaluate_base(cfg, plan, out, base_seed):
    """evaluate.py on a base, unless done: None, or what failed. A worker's task."""
    folder, log = out / "eval" / "bases" / f"seed_{base_seed}", out / "logs" / f"eval_base_{base_seed}.log"
    models = [base_folder(plan, out, base_seed)]
    if evaluated(folder, models) or script(evaluate_args(cfg, out, folder, models, plan.samples), log):
        return None
    return f"evaluating base {base_seed} failed; see {log}"


def self_play(cfg, plan, out, run, shortened_runs=()):
    """One arm x seed x base: self-play (resumed if a folder is there), then evaluate.py on its
    Reasoners and on those of the runs that are this one shortened (`eval_folder`): None, or what
    failed. A worker's task."""
    folder, log = out / "runs" / run.name, out / "logs" / f"{safe_name(run.name)}.log"
    if folder.is_dir():
        argv = ["selfplay.py", "--resume", folder]
    else:
        argv = ["selfplay.py", *plan.presets, ARMS / f"{run.arm}.toml",
                "--model", base_folder(plan, out, run.base_seed), "--images", out / "images" / f"base_{run.base_seed}",
                "--output", folder, "--seed", run.seed, "--device", cfg.device, "--quiet"]
    if not script(argv, log):
        return f"{run.name}: selfplay.py failed; see {log}"
    for each in (run, *shortened_runs):
        *earlier, last = reasoners(out, each)
        for where, models, samples in ((eval_folder(out, each, last=True), [last], plan.samples),
                                       (eval_folder(out, each, last=False), earlier, 0)):
            if models and not evaluated(where, models) and \
                    not script(evaluate_args(cfg, out, where, models, samples, blind=samples > 0), log):
                return f"{each.name}: evaluate.py failed; see {log}"
    return None


def eval_folder(out, run, last):
    """Where a run's last Reasoner is evaluated in full (greedy, blind, m samples), and where its
    earlier ones are, for the curve: greedy alone, all the table takes from them. A shortened
    run's earlier Reasoners are its source's, already in the source's curve."""
    return out / "eval" / run.name if last else out / "eval" / run.trained.name / "curve"


def evaluate_args(cfg, out, folder, models, samples, blind=True):
    # batch 200: fewer Python steps than 48, the same answers (each question draws from its own stream)
    argv = ["evaluate.py", "--bench", out / "bench" / "heldout.jsonl", "--output", folder, "--samples", samples,
            "--max-new-tokens", 48, "--batch-size", 200, "--device", cfg.device, "--quiet", "--no-blind-samples"]
    for model in models:
        argv += ["--model", model]
    return argv + ([] if blind else ["--no-blind"])


def evaluated(folder, models):
    """Whether evaluate.py has finished every model into folder (it writes results.json after each)."""
    try:
        done = json.loads((folder / "results.json").read_text())["benchmarks"]["heldout"]["models"]
    except (OSError, ValueError, KeyError):
        return False
    return all(str(m) in done for m in models)


def workers(cfg):
    """cfg.jobs worker processes (start_worker): on CUDA each holds a GPU of its own."""
    gpus = (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(_gpus())))).split(",") \
        if cfg.device == "cuda" else []
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no threads inherited
    slots = context.SimpleQueue()
    for slot in range(cfg.jobs):
        slots.put(gpus[slot % len(gpus)] if gpus else None)
    # an executor, not a multiprocessing.Pool: a worker the OS kills (out of memory) fails its
    # task with BrokenProcessPool, where a Pool would start another worker and wait forever
    return concurrent.futures.ProcessPoolExecutor(cfg.jobs, mp_context=context, initializer=start_worker,
                                                  initargs=(slots, cfg.device))


def call(task):
    function, args = task
    return function(*args)


def run_tasks(pool, tasks, desc):
    """Runs (function, args) tasks on the workers, a progress bar over them; exits naming the
    failed ones. Ctrl-C stops the workers at once (a killed run resumes where it was)."""
    if not tasks:
        return
    failed = []
    with progress(total=len(tasks), desc=desc, unit="job") as bar:
        try:
            for done in concurrent.futures.as_completed([pool.submit(call, task) for task in tasks]):
                bar.update()  # the bar moves as each task ends
                if failure := done.result():
                    failed.append(failure)
        except concurrent.futures.process.BrokenProcessPool:
            failed.append("a worker process died (killed by the OS: out of memory?)")
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # the workers, mid-task
                child.terminate()
            raise
    if failed:
        sys.exit("ablate.py: " + "; ".join(failed) + " (run the same command again to go on)")


# -----------------------------------------------------------------------------
# Statistics

def bootstrap(values, reps, rng):
    """values: [R, Q], one row per run, one column per question (0/1 verdicts, or the differences
    of two arms' verdicts run by run) -> (mean, [low, high]): the mean and its 95% percentile
    interval when runs and questions are both resampled with replacement. Every run answers the
    same questions, so one draw of questions serves all rows: a question's difficulty is shared
    by the runs, as it is in the data. With one run, only the questions vary."""
    values = np.asarray(values, dtype=float)
    R, Q = values.shape
    means = np.empty(reps)
    for start in range(0, reps, 256):  # [256, R, Q] at a time: memory stays small
        n = min(256, reps - start)
        rows = rng.integers(R, size=(n, R, 1))
        cols = rng.integers(Q, size=(n, 1, Q))
        means[start:start + n] = values[rows, cols].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), [float(low), float(high)]


def verdicts(folder, model):
    """Per held-out question, in benchmark order: whether the greedy answer is right, and its category."""
    rows = [json.loads(line) for line in open(folder / "samples" / safe_name(str(model)) / "heldout.jsonl")]
    return {"greedy": np.array([r["correct"] for r in rows], dtype=float), "category": [r["category"] for r in rows]}


def scores(folder, model):
    """{greedy, pass1, maj, blind} accuracies of one model from evaluate.py's results.json."""
    r = json.loads((folder / "results.json").read_text())["benchmarks"]["heldout"]["models"][str(model)]
    return {"greedy": r["accuracy"], "pass1": r["pass1"]["accuracy"], "maj": r["maj"]["accuracy"],
            "blind": r["blind"]["accuracy"]}


def curation(run_folder):
    """Per iteration, from a run's metrics: silver-label accuracy, kept and candidate counts, and
    the categories of the valid candidates (the Questioner's mix) and of the kept ones."""
    lines = [json.loads(line) for line in open(run_folder / "metrics.jsonl")]
    return [{key: m.get(key) for key in ("iteration", "silver_accuracy", "n_kept", "n_candidates", "categories",
                                         "kept_categories")} for m in lines if m["phase"] == "curation"]


def mix(counts):
    """{category: count} -> {category: share} over data.CATEGORIES (and 'other' where counted), 0 where absent."""
    total = sum(counts.values()) or 1
    return {c: counts.get(c, 0) / total for c in (*data.CATEGORIES, "other") if c in counts or c != "other"}


def summarise(cfg, plan, out, runs, seconds, command):
    """What ablation.json holds (see the README's "Run an ablation")."""
    rng = np.random.default_rng(0)
    bases = sorted({r.base_seed for r in runs})
    base_v = {b: verdicts(out / "eval" / "bases" / f"seed_{b}", base_folder(plan, out, b)) for b in bases}
    base_scores = [scores(out / "eval" / "bases" / f"seed_{b}", base_folder(plan, out, b)) for b in bases]
    categories = base_v[bases[0]]["category"]
    asked = [c for c in data.CATEGORIES if c in categories]  # the world's, in data.CATEGORIES' order
    by_category = lambda v: {c: float(np.mean([x for x, k in zip(v, categories) if k == c])) for c in asked}
    summary = {"command": command, "config": asdict(cfg), "plan": asdict(plan), "categories": asked,
               "questions": len(categories), "runs_per_arm": plan.seeds * cfg.base_seeds,
               "base": {**{key: float(np.mean([s[key] for s in base_scores])) for key in base_scores[0]},
                        "by_category": by_category(np.mean([base_v[b]["greedy"] for b in bases], axis=0))},
               "arms": {}}
    last_of = {}  # arm -> [R, Q] greedy verdicts of each run's last Reasoner, runs in one order for every arm
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [r for r in runs if r.arm == arm]
        models = [reasoners(out, r) for r in mine]
        K = max(map(len, models))
        v = [[verdicts(eval_folder(out, r, last=k == len(ms) - 1), m) for k, m in enumerate(ms)]
             for r, ms in zip(mine, models)]
        curve = [{"iteration": 0, **dict(zip(("mean", "ci95"),
                                             bootstrap([base_v[r.base_seed]["greedy"] for r in mine], cfg.bootstrap,
                                                       rng)))}]
        for k in range(K):
            curve.append({"iteration": k + 1, **dict(zip(("mean", "ci95"), bootstrap(
                [run_v[k]["greedy"] for run_v in v if len(run_v) > k], cfg.bootstrap, rng)))})
        last_of[arm] = np.array([run_v[-1]["greedy"] for run_v in v])
        mean, ci95 = bootstrap(last_of[arm], cfg.bootstrap, rng)  # each run's last Reasoner, whatever its K
        per_seed = {r.name.split("/", 1)[1]: scores(eval_folder(out, r, last=True), ms[-1])
                    for r, ms in zip(mine, models)}
        questions = [curation(out / "runs" / r.trained.name)[:len(ms)] for r, ms in zip(mine, models)]
        summary["arms"][arm] = {
            "mean": mean, "ci95": ci95, "per_seed": per_seed, "curve": curve,
            "by_category": by_category(last_of[arm].mean(axis=0)),
            **{key: float(np.mean([s[key] for s in per_seed.values()])) for key in ("pass1", "maj", "blind")},
            "curation": [{"iteration": k + 1,
                          "silver_accuracy": _mean([q[k]["silver_accuracy"] for q in questions if len(q) > k]),
                          "kept": _mean([q[k]["n_kept"] for q in questions if len(q) > k]),
                          "candidates": _mean([q[k]["n_candidates"] for q in questions if len(q) > k]),
                          "mix": mix(_total([q[k]["categories"] for q in questions if len(q) > k])),
                          "kept_mix": mix(_total([q[k]["kept_categories"] for q in questions if len(q) > k]))}
                         for k in range(K)],
            "paired_diff": None}
    for arm, entry in summary["arms"].items():
        if arm != "method":
            mean, ci95 = bootstrap(last_of[arm] - last_of["method"], cfg.bootstrap, rng)
            entry["paired_diff"] = {"mean": mean, "ci95": ci95}
    summary["title"] = (f"Ablation: {len(summary['arms'])} arms, {len(categories)} held-out questions "
                        f"(--world {plan.world})")  # the markdown's and the page's heading
    summary["seconds"] = seconds
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _total(counts):
    total = {}
    for c in counts:
        for key, n in (c or {}).items():
            total[key] = total.get(key, 0) + n
    return total


# -----------------------------------------------------------------------------
# The tables

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def interval(ci):
    return f"[{pct(ci[0])}, {pct(ci[1])}]"


def markdown(summary):
    """ablation.md: the main table, greedy accuracy per category, and what curation kept per iteration."""
    b, arms, asked = summary["base"], summary["arms"], summary["categories"]
    lines = [f"# {summary['title']}", "",
             f"    {summary['command']}", "",
             f"Greedy accuracy (%) of each arm's last Reasoner, mean over {summary['runs_per_arm']} runs with a 95% "
             "bootstrap interval (runs and questions resampled); Δ: the paired difference to `method` on the same "
             f"questions and seeds. The base: greedy {pct(b['greedy'])}, pass@1 {pct(b['pass1'])}, "
             f"maj@{summary['plan']['samples']} {pct(b['maj'])}, blind {pct(b['blind'])}.", "",
             f"| arm | greedy | 95% interval | Δ vs method | 95% interval | pass@1 | maj@{summary['plan']['samples']} "
             "| blind |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        d = a["paired_diff"]
        diff = ("-", "-") if d is None else (f"{100 * d['mean']:+.1f}", interval(d["ci95"]))
        lines.append(f"| {arm} | {pct(a['mean'])} | {interval(a['ci95'])} | {diff[0]} | {diff[1]} | "
                     f"{pct(a['pass1'])} | {pct(a['maj'])} | {pct(a['blind'])} |")
    lines += ["", "Greedy accuracy (%) per category, the last Reasoner (mean over runs):", "",
              "| arm | " + " | ".join(asked) + " |", "|---|" + "---|" * len(asked),
              "| base | " + " | ".join(pct(b["by_category"][c]) for c in asked) + " |"]
    lines += [f"| {arm} | " + " | ".join(pct(a["by_category"][c]) for c in asked) + " |"
              for arm, a in arms.items()]
    lines += ["", "Curation per iteration (mean over runs): silver-label accuracy (%), questions kept of the "
              "candidates, and the Questioner's category mix (% of its valid candidates: "
              + ", ".join(f"{c[:5]}" for c in asked) + ").", "",
              "| arm | iteration | silver accuracy | kept | of | mix |", "|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        for c in a["curation"]:
            shares = " / ".join(f"{100 * c['mix'].get(k, 0):.0f}" for k in asked)
            kept, of = ("-" if x is None else f"{x:.0f}" for x in (c["kept"], c["candidates"]))
            lines.append(f"| {arm} | {c['iteration']} | {pct(c['silver_accuracy'])} | {kept} | {of} | {shares} |")
    lines += ["", f"{summary['seconds'] / 60:.1f} minutes."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The command

def same_plan(out, plan):
    """Writes OUT/plan.json the first time; later, refuses a plan that differs from it, since the
    benchmark, the images and every run in OUT were made by the first one."""
    # more seeds or arms may join; the shared settings are kept too, in case a preset file changes
    # (the world by its flags, as before there was a choice of worlds: such a plan.json still reads)
    plan_fields = {k: v for k, v in asdict(replace(plan, seeds=None)).items() if k != "world"}
    wanted = {"plan": plan_fields, "world": list(WORLDS[plan.world].flags),
              "settings": settings(plan)}
    path = out / "plan.json"
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(wanted)):
            raise data.DataError(f"'{out}' holds an ablation of another plan ({path}): give --quick and --world "
                                 "as it was made with, or a new OUT")
    else:
        out.mkdir(parents=True, exist_ok=True)
        data.write_atomic(path, json.dumps(wanted, indent=2) + "\n")


def chosen_arms(cfg):
    """The arms' names, `method` first (every difference is taken to it); exits 2 on an unknown one."""
    known = sorted(p.stem for p in ARMS.glob("*.toml"))
    names = [a for a in cfg.arms.split(",") if a] or known
    unknown = [a for a in names if a not in known]
    if unknown:
        raise data.DataError(f"--arms: no arm '{unknown[0]}' (the files of presets/ablation/: {', '.join(known)})")
    return ["method", *dict.fromkeys(a for a in names if a != "method")]


def tasks(cfg, plan, out, runs, iterations):
    """The workers' tasks after pretraining: each base's evaluation, then the runs that train, the
    longest first (so no core waits long for the last one; iterations: {arm: its iterations}),
    each with the shortened runs it serves."""
    trained = sorted((r for r in runs if not r.source), key=lambda r: -iterations[r.arm])
    return [(evaluate_base, (cfg, plan, out, b)) for b in sorted({r.base_seed for r in runs})] + \
        [(self_play, (cfg, plan, out, run, [r for r in runs if r.source and r.trained == run])) for run in trained]


def main(argv=None):
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    argv = ["--out", *given] if given and not given[0].startswith("-") else given  # `ablate.py OUT` is `--out OUT`
    cfg = parse(Config, argv, __doc__.split("\n\n")[0])
    plan = QUICK if cfg.quick else FULL
    plan = replace(plan, seeds=cfg.seeds or plan.seeds, world=cfg.world)
    cfg = replace(cfg, seeds=plan.seeds,
                  jobs=cfg.jobs or (len(os.sched_getaffinity(0)) if cfg.device == "cpu" else _gpus()))
    try:
        stacked = {arm: settings(plan, arm) for arm in chosen_arms(cfg)}
        short = shortened(stacked)
    except data.DataError as err:
        print(f"ablate.py: error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.out).resolve()  # the scripts run from the repo's root
    runs = [Run(arm, seed, b, *short.get(arm, ("", 0))) for b in range(cfg.base_seeds) for arm in stacked
            for seed in range(plan.seeds)]
    again = "".join(f"; {arm}: the first {k} iteration(s) of {source}" for arm, (source, k) in short.items())
    print(f"ablation into {out}: {len(stacked)} arms x {plan.seeds} seeds x {cfg.base_seeds} base(s) = {len(runs)} "
          f"runs ({sum(not r.source for r in runs)} trained{again}) and {cfg.base_seeds} base evaluation(s), "
          f"{cfg.jobs} at a time; {plan.held_out} held-out questions of the {plan.world} world", flush=True)
    start = time.perf_counter()
    try:
        same_plan(out, plan)
    except data.DataError as err:
        print(f"ablate.py: error: {err}", file=sys.stderr)
        return 2
    make_benchmark(out, plan)
    with workers(cfg) as pool:
        run_tasks(pool, [(make_base, (plan, out, b)) for b in range(cfg.base_seeds)
                         if not (base_folder(plan, out, b) / pretrain.CONFIG_FILE).is_file()], "bases")
        for b in range(cfg.base_seeds):
            make_images(out, plan, b)
        run_tasks(pool, tasks(cfg, plan, out, runs, {arm: s["iterations"] for arm, s in stacked.items()}), "runs")
    summary = summarise(cfg, plan, out, runs, time.perf_counter() - start, "python ablate.py " + " ".join(given))
    data.write_atomic(out / "ablation.json", json.dumps(summary, indent=2) + "\n")
    data.write_atomic(out / "ablation.md", markdown(summary))
    data.write_atomic(out / "ablation.html", ablation_page.page(summary))
    print(markdown(summary))
    print(f"done: {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.html'}")
    return 0


def _gpus():
    import torch
    return max(torch.cuda.device_count(), 1)


if __name__ == "__main__":
    sys.exit(main())
