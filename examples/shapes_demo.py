"""See it learn: label-free self-play improving a model we pretrain ourselves, in a world where every
answer is known, with the controls that tell a real gain from noise.

    bash examples/shapes_demo.sh OUT [SEED]        # or: python examples/shapes_demo.py OUT [--seed SEED]

1. pretrain.py: a small Qwen2.5-VL learns the shapes world in both roles (the warm start).
2. Unlabeled images of that world for self-play, and a held-out benchmark of questions on scenes
   from another random stream (never trained on, never tuned on).
3. Three self-play runs from the same base, K iterations each:
   - selfplay: the method;
   - random_labels: the same loop, each kept question labelled with a random one of the Reasoner's
     answers instead of the majority (`--silver-labels random`): what training on the same
     questions without the vote gives;
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import pretrain  # noqa: E402

ITERATIONS = 3
HELD_OUT = 500  # questions of the benchmark
TRAIN_IMAGES = 256  # unlabeled images for self-play
SAMPLES = 8  # m of evaluate.py's maj@m and pass@1
# Streams of scenes: pretraining draws its own from the seed; these never meet them or each other.
TRAIN_STREAM, BENCH_STREAM = 10_000, 20_000
SELFPLAY_FLAGS = [
    "--iterations", str(ITERATIONS), "--questioner-steps", "4", "--reasoner-steps", "8",
    "--group-size", "8", "--images-per-step", "8", "--question-max-tokens", "24", "--answer-max-tokens", "48",
    "--reward-votes", "8", "--curation-images", "48", "--candidates-per-image", "4", "--curation-votes", "8",
    "--questions-per-step", "8", "--lr", "5e-5", "--kl-coef", "0", "--minibatches", "1",
    "--micro-batch-tokens", "4096", "--quiet", "--threads", "1",
]
CONTROLS = {"selfplay": [], "random_labels": ["--silver-labels", "random"],
            "frozen_questioner": ["--questioner-steps", "0"]}


def run(args, log):
    """Runs a script of the repo with one torch thread, its output into `log`; stops the demo on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.exit(f"{args[0]} failed (exit {done.returncode}); see {log}")


def write_benchmark(folder, world, categories, seed):
    """HELD_OUT questions on fresh scenes as evaluate.py's JSONL, images beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in data.shapes_benchmark(HELD_OUT, seed=seed, categories=categories, **world):
        r["image"].save(folder / f"{r['id']}.png")
        lines.append(json.dumps({"id": r["id"], "image": f"{r['id']}.png", "question": r["question"],
                                 "answer": r["answer"], "category": r["category"]}) + "\n")
    data.write_atomic(folder / "heldout.jsonl", "".join(lines))
    return folder / "heldout.jsonl"


def silver_accuracy(run_dir):
    """{iter_k: the share of curation's kept questions whose silver label is the true answer}."""
    lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {f"iter_{m['iteration']}": m.get("silver_accuracy") for m in lines if m["phase"] == "curation"}


def table(models):
    rows = ["| model | greedy | 95% interval | blind | pass@1 (T=1) | maj@%d |" % SAMPLES, "|---|---|---|---|---|---|"]
    for name, r in models.items():
        low, high = r["wilson95"]
        rows.append(f"| {name} | {r['accuracy']:.1%} | [{low:.1%}, {high:.1%}] | {r['blind']['accuracy']:.1%} | "
                    f"{r['pass1']['accuracy']:.1%} | {r['maj']['accuracy']:.1%} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for everything the demo writes")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pretraining, the images and self-play")
    args = parser.parse_args(argv)
    out, seed = Path(args.out), args.seed
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: '{out}' is not empty: pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"shapes demo, seed {seed}, into {out}: pretrain a small model, {len(CONTROLS)} self-play runs of "
          f"{ITERATIONS} iterations (the method and two controls), evaluation on {HELD_OUT} held-out questions. "
          "About 20 minutes on 2 CPU cores.", flush=True)

    print("1/4 pretraining the base model ...", flush=True)
    run([REPO / "pretrain.py", "--output", out / "base", "--seed", seed, "--quiet"], out / "pretrain.log")
    cfg = pretrain.load_config(out / "base")
    world, categories = cfg.world(), cfg.categories.split(",")

    print("2/4 writing unlabeled images and the held-out benchmark ...", flush=True)
    data.write_shapes_folder(out / "images", TRAIN_IMAGES, seed=TRAIN_STREAM + seed, **world)
    bench = write_benchmark(out / "bench", world, categories, seed=BENCH_STREAM + seed)

    print(f"3/4 self-play: {', '.join(CONTROLS)} (two at a time) ...", flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two runs of one thread each
        list(pool.map(lambda name: run([REPO / "selfplay.py", "--model", out / "base", "--images", out / "images",
                                        "--output", out / name, "--seed", seed, *SELFPLAY_FLAGS, *CONTROLS[name]],
                                       out / f"{name}.log"), CONTROLS))

    print("4/4 evaluating ...", flush=True)
    models = {"base": out / "base", **{f"iter_{k}": out / "selfplay" / f"iter_{k}" / "reasoner"
                                       for k in range(1, ITERATIONS + 1)},
              **{name: out / name / f"iter_{ITERATIONS}" / "reasoner" for name in CONTROLS if name != "selfplay"}}
    argv = [REPO / "evaluate.py", "--bench", f"heldout={bench}", "--output", out / "eval", "--samples", SAMPLES,
            "--max-new-tokens", 48, "--device", "cpu", "--quiet"]
    for name, path in models.items():
        argv += ["--model", f"{path}"]
    run(argv, out / "evaluate.log")
    results = json.loads((out / "eval" / "results.json").read_text())["benchmarks"]["heldout"]["models"]
    demo = {"models": {name: results[str(path)] for name, path in models.items()},
            "silver_accuracy": silver_accuracy(out / "selfplay"),
            "controls_silver_accuracy": {name: silver_accuracy(out / name) for name in CONTROLS if name != "selfplay"},
            "seed": seed, "seconds": time.perf_counter() - start}
    data.write_atomic(out / "demo.json", json.dumps(demo, indent=2) + "\n")
    print(table(demo["models"]))
    print("silver-label accuracy: " + ", ".join(f"{k} {v:.1%}" if v is not None else f"{k} -"
                                              for k, v in demo["silver_accuracy"].items()))
    print(f"done in {demo['seconds'] / 60:.1f} minutes: {out / 'demo.json'}, reports in {out}/*/report.html")


if __name__ == "__main__":
    main()
