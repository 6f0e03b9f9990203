"""See it learn: label-free self-play improving a model we pretrain ourselves, in a world where every
answer is known, with the controls that tell a real gain from noise.

    bash examples/shapes_demo.sh OUT [SEED] [--quick]   # or: python examples/shapes_demo.py OUT [--seed SEED] [--quick]

1. tools/pretrain.py: a small Qwen2.5-VL learns the shapes world in both roles (the warm start). Its
   Reasoner has a hasty habit: greedy decoding mostly guesses, while the samples that check the
   image agree and the guesses scatter, so the majority of its answers knows more than its greedy
   one (pretrain.py says how).
2. Unlabeled images of that world for self-play, and a held-out benchmark of questions on scenes
   from another random stream (never trained on, never tuned on).
3. Three self-play runs from the same base, K iterations each:
   - selfplay: the method;
   - random_labels: the same loop, each kept question labelled with one of the Reasoner's distinct
     answers at random instead of the majority (`--silver-labels random`): the same questions and
     the same answers to choose from, without the vote;
   - frozen_questioner: the Questioner never trained (`--questioner-steps 0`), the paper's ablation.
4. evaluate.py on the base, the Reasoner of every iteration and the two controls' last Reasoners:
   greedy accuracy, the same questions with the images shuffled (blind), pass@1 at temperature 1
   and maj@m.
OUT/demo.json holds evaluate.py's result per model and the silver-label accuracy of every
iteration (curation's labels checked against the true answers, which training never sees).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
from tools import pretrain  # noqa: E402

# Streams of scenes: pretraining draws its own from the seed; these never meet them or each other.
TRAIN_STREAM, BENCH_STREAM = 10_000, 20_000
PRESET = REPO / "presets" / "demo.toml"  # the self-play settings of every run
CONTROLS = {"selfplay": (), "random_labels": ("--silver-labels", "random"),
            "frozen_questioner": ("--questioner-steps", "0")}


@dataclass(frozen=True)
class Plan:
    """How much the demonstration does: FULL, or QUICK (--quick, and the slow test)."""
    pretrain: tuple = ()  # pretrain.py flags beyond its defaults
    iterations: int = 3
    train_images: int = 256  # unlabeled images for self-play
    held_out: int = 500  # questions of the benchmark
    samples: int = 8  # evaluate.py's m for pass@1 and maj@m; 0: greedy only, and no blind baseline
    runs: tuple = tuple(CONTROLS)
    every_iteration: bool = True  # evaluate each iteration's Reasoner of the method, not only the last


FULL = Plan()
# A few minutes: a shorter pretraining, two iterations of the method and of the random-label
# control, greedy accuracy on 200 held-out questions (no samples, so no blind, pass@1 or maj@m).
QUICK = Plan(pretrain=("--steps", "400", "--guess-steps", "100", "--eval-questions", "0"), iterations=2,
             train_images=128, held_out=200, samples=0, runs=("selfplay", "random_labels"), every_iteration=False)


def run(args, log):
    """Runs a script of the repo with one torch thread, its output into `log`; stops the demo on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"{Path(args[0]).name} failed (exit {done.returncode}); see {log}")


def silver_accuracy(run_dir):
    """{iter_k: the share of curation's kept questions whose silver label is the true answer}."""
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {f"iter_{m['iteration']}": m.get("silver_accuracy") for m in lines if m["phase"] == "curation"}


def demo(out, seed, plan=FULL, base=None):
    """Pretrains, self-plays and evaluates into the folder `out`; returns what demo.json holds.
    base: a folder tools/pretrain.py made, used instead of pretraining one."""
    start = time.perf_counter()
    if base is None:
        print("1/4 pretraining the base model ...", flush=True)
        base = out / "base"
        run([REPO / "tools" / "pretrain.py", "--output", base, "--seed", seed, "--quiet", *plan.pretrain],
            out / "pretrain.log")
    else:
        print(f"1/4 the base model: {base}", flush=True)
    cfg = pretrain.load_config(base)
    world, categories = cfg.world(), cfg.categories.split(",")

    print("2/4 writing unlabeled images and the held-out benchmark ...", flush=True)
    data.write_shapes_folder(out / "images", plan.train_images, seed=TRAIN_STREAM + seed, **world)
    bench = data.write_benchmark(out / "bench", plan.held_out, seed=BENCH_STREAM + seed, categories=categories, **world)

    print(f"3/4 self-play: {', '.join(plan.runs)} (two at a time) ...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two runs of one thread each
        list(pool.map(lambda name: run([REPO / "selfplay.py", PRESET, "--model", base, "--images",
                                        out / "images", "--output", out / name, "--seed", seed, "--iterations",
                                        plan.iterations, *CONTROLS[name]], out / f"{name}.log"), plan.runs))

    print("4/4 evaluating ...", flush=True)
    last = f"iter_{plan.iterations}"
    models = {"base": base}
    if plan.every_iteration:
        models |= {f"iter_{k}": out / "selfplay" / f"iter_{k}" / "reasoner" for k in range(1, plan.iterations)}
    models |= {last if name == "selfplay" else name: out / name / last / "reasoner" for name in plan.runs}
    argv = [REPO / "evaluate.py", "--bench", bench, "--output", out / "eval", "--samples", plan.samples,
            "--max-new-tokens", 48, "--device", "cpu", "--quiet", *([] if plan.samples else ["--no-blind"])]
    for path in models.values():
        argv += ["--model", path]
    run(argv, out / "evaluate.log")
    results = json.loads((out / "eval" / "results.json").read_text())["benchmarks"]["heldout"]["models"]
    return {"models": {name: results[str(path)] for name, path in models.items()},
            "silver_accuracy": silver_accuracy(out / "selfplay"),
            "controls_silver_accuracy": {name: silver_accuracy(out / name) for name in plan.runs if name != "selfplay"},
            "seed": seed, "seconds": time.perf_counter() - start}


def table(models, m):
    """The demo's table; a column the plan did not measure (no samples: no blind, pass@1, maj@m) shows "-"."""
    def share(result, key):
        return f"{result[key]['accuracy']:.1%}" if key in result else "-"
    rows = [f"| model | greedy | 95% interval | blind | pass@1 (T=1) | maj@{m or 'm'} |", "|---|---|---|---|---|---|"]
    for name, r in models.items():
        low, high = r["wilson95"]
        rows.append(f"| {name} | {r['accuracy']:.1%} | [{low:.1%}, {high:.1%}] | {share(r, 'blind')} | "
                    f"{share(r, 'pass1')} | {share(r, 'maj')} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for everything the demo writes")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pretraining, the images and self-play")
    parser.add_argument("--quick", action="store_true", help="the cut-down demonstration: a few minutes, "
                        "the method and the random-label control only, greedy accuracy on 200 questions")
    parser.add_argument("--base", type=Path, help="a base tools/pretrain.py made, instead of pretraining one "
                        "(examples/shapes_base is the --quick plan's at seed 0)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = Path(args.out).resolve()  # the scripts it runs work from the repo's root
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"shapes_demo.py: error: '{out}' exists and is not an empty folder: pass a new one", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(f"shapes demo{' (quick)' if args.quick else ''}, seed {args.seed}, into {out}: pretrain a small model, "
          f"{len(plan.runs)} self-play runs of {plan.iterations} iterations (the method and "
          f"{len(plan.runs) - 1} control{'s' if len(plan.runs) > 2 else ''}), evaluation on {plan.held_out} held-out "
          f"questions. About {5 if args.quick else 15} minutes on 2 idle CPU cores.", flush=True)
    result = demo(out, args.seed, plan, args.base and args.base.resolve())
    data.write_atomic(out / "demo.json", json.dumps(result, indent=2) + "\n")
    print(table(result["models"], plan.samples))
    shares = lambda by_iteration: ", ".join("-" if v is None else f"{v:.1%}" for v in by_iteration.values())
    print(f"silver-label accuracy per iteration: the method {shares(result['silver_accuracy'])}; " +
          "; ".join(f"{name} {shares(v)}" for name, v in result["controls_silver_accuracy"].items()))
    print(f"done in {result['seconds'] / 60:.1f} minutes: {out / 'demo.json'}, reports in {out}/*/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
