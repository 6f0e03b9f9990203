"""ablate.py's statistics and inputs, and the controls it runs (data.oracle_labels, data.null_labels,
the difficulty reward switched off): each checked against an independent reference."""

import json
import math
import os
import tomllib
from dataclasses import replace

import numpy as np
import pytest

import ablate
import data
import selfplay
from model import load_processors
from rewards import uncertainty_reward
from tools import pretrain


def test_bootstrap_of_one_run_matches_the_normal_interval_of_a_proportion():
    """One run: only questions are resampled, so the interval is the binomial one, p ± 1.96·sqrt(p(1-p)/n)
    (n = 400: the normal approximation is good to about a point; the Monte Carlo error of 4000 resamples
    is ~0.1 point)."""
    rng = np.random.default_rng(1)
    correct = (rng.random((1, 400)) < 0.3).astype(float)
    p = correct.mean()
    mean, (low, high) = ablate.bootstrap(correct, 4000, np.random.default_rng(0))
    half = 1.959964 * math.sqrt(p * (1 - p) / 400)
    assert mean == pytest.approx(p)
    assert low == pytest.approx(p - half, abs=0.012) and high == pytest.approx(p + half, abs=0.012)


def test_bootstrap_widens_with_the_spread_between_runs():
    """Runs that disagree (two at 20%, two at 80%) give a wider interval than runs that agree at the same
    mean: the runs are resampled too, not only the questions."""
    rng = np.random.default_rng(2)
    agree = (rng.random((4, 300)) < 0.5).astype(float)
    apart = np.stack([(rng.random(300) < p).astype(float) for p in (0.2, 0.8, 0.2, 0.8)])
    width = lambda v: np.diff(ablate.bootstrap(v, 2000, np.random.default_rng(0))[1])[0]
    assert width(apart) > 2 * width(agree)


def test_a_paired_difference_cancels_what_two_arms_share():
    """The same verdicts but one question flipped right in the arm: the difference's interval is tight
    around +1/Q, far tighter than either arm's own interval."""
    rng = np.random.default_rng(3)
    method = (rng.random((3, 200)) < 0.5).astype(float)
    method[:, 0] = 0
    arm = method.copy()
    arm[:, 0] = 1
    mean, (low, high) = ablate.bootstrap(arm - method, 2000, np.random.default_rng(0))
    arm_low, arm_high = ablate.bootstrap(arm, 2000, np.random.default_rng(0))[1]
    assert mean == pytest.approx(1 / 200) and high <= 0.02 and high - low < 0.2 * (arm_high - arm_low)


def test_an_unknown_arm_is_one_line_exit_2(tmp_path, capsys):
    assert ablate.main([str(tmp_path / "out"), "--arms", "method,no_such_arm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no arm 'no_such_arm'" in err
    assert not (tmp_path / "out").exists(), "nothing written before the arms are known"


def test_every_arm_runs_with_the_shared_settings_stacked():
    """Each arm file parses as a selfplay.Config stacked on the shared preset(s), `method` first in the
    order ablate.py runs them, and only the arm's own settings differ from the method's."""
    arms = ablate.chosen_arms(ablate.Config(out="x"))
    assert arms[0] == "method" and {"oracle_labels", "null_labels", "vote_random", "frozen_questioner",
                                    "no_diversity", "no_difficulty", "one_iteration"} <= set(arms)
    for plan in (ablate.FULL, ablate.QUICK):
        base = selfplay.parse_given(selfplay.Config, [*plan.presets, ablate.ARMS / "method.toml"])[0]
        for arm in arms:
            path = ablate.ARMS / f"{arm}.toml"
            cfg = selfplay.parse_given(selfplay.Config, [*plan.presets, path])[0]
            changed = {k for k, v in vars(cfg).items() if v != vars(base)[k]}
            assert changed == set(tomllib.loads(path.read_text())), arm


def test_an_arm_file_that_does_not_parse_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "method.toml").write_text("")
    (tmp_path / "bad.toml").write_text("iterations = \n")
    monkeypatch.setattr(ablate, "ARMS", tmp_path)
    assert ablate.main([str(tmp_path / "out"), "--arms", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the preset" in err and "bad.toml" in err
    assert not (tmp_path / "out").exists()


def test_an_arm_that_is_another_stopped_early_is_not_trained_again(tmp_path, monkeypatch):
    """`shortened` holds the arms whose settings, stacked as selfplay.py stacks them, are another
    arm's but for fewer iterations: in the shipped arms one_iteration is the method's first; an arm
    that changes anything else besides is trained. `tasks` trains each run once, the longest
    first, and hands it the shortened runs of its seed and base."""
    arms = ablate.chosen_arms(ablate.Config(out="x"))
    for plan in (ablate.FULL, ablate.QUICK):
        assert ablate.shortened({arm: ablate.settings(plan, arm) for arm in arms}) == {"one_iteration": ("method", 1)}
    for name, text in {"method": "", "two": "iterations = 2", "one": "iterations = 1", "lr": "lr = 1e-4",
                       "lr_one": "iterations = 1\nlr = 1e-4", "lr_five": "iterations = 5\nlr = 1e-4"}.items():
        (tmp_path / f"{name}.toml").write_text(text + "\n")
    monkeypatch.setattr(ablate, "ARMS", tmp_path)
    arms = ["method", "two", "one", "lr", "lr_one", "lr_five"]
    stacked = {arm: ablate.settings(ablate.FULL, arm) for arm in arms}
    short = ablate.shortened(stacked)
    assert short == {"two": ("method", 2), "one": ("method", 1), "lr": ("lr_five", 3), "lr_one": ("lr_five", 1)}

    runs = [ablate.Run(arm, seed, b, *short.get(arm, ("", 0))) for b in (0, 1) for arm in arms for seed in (0, 1)]
    cfg = ablate.Config(out=str(tmp_path))
    todo = ablate.tasks(cfg, ablate.FULL, tmp_path, runs, {arm: s["iterations"] for arm, s in stacked.items()})
    assert [(f.__name__, args[-1]) for f, args in todo[:2]] == [("evaluate_base", 0), ("evaluate_base", 1)]
    trained = [(args[3], args[4]) for _, args in todo[2:]]
    assert [run.arm for run, _ in trained] == ["lr_five"] * 4 + ["method"] * 4  # 5 iterations, then 3
    for run, served in trained:
        assert {(r.arm, r.seed, r.base_seed) for r in served} == {
            (arm, run.seed, run.base_seed) for arm, (source, _) in short.items() if source == run.arm}
    assert sorted(r.name for _, served in trained for r in served) == sorted(r.name for r in runs if r.source)


@pytest.mark.parametrize("world", sorted(ablate.WORLDS))
def test_the_shipped_base_is_the_world_command_at_seed_0(world):
    cfg = pretrain.load_config(ablate.WORLDS[world].base)
    assert pretrain.parse(pretrain.Config, [*ablate.WORLDS[world].flags, "--seed", "0", "--quiet",
                                            "--output", cfg.output]) == cfg


def test_the_counting_world_asks_and_tables_counting_alone(tmp_path):
    """Its benchmark, its self-play images and its tables are the counting world's; an OUT made
    in one world refuses the other."""
    plan = replace(ablate.QUICK, world="counting", train_images=4)
    ablate.make_benchmark(tmp_path, plan)
    rows = [json.loads(line) for line in open(tmp_path / "bench" / "heldout.jsonl")]
    assert len(rows) == plan.held_out and {r["category"] for r in rows} == {"counting"}
    images = ablate.make_images(tmp_path, plan, 0)
    world = pretrain.load_config(ablate.WORLDS["counting"].base).world()
    assert not world["two_sizes"] and list(data.load_scenes(images).values())[0] == data.make_scene(
        data._image_seeds(1, ablate.TRAIN_STREAM)[0], **world)
    ablate.same_plan(tmp_path, plan)
    ablate.same_plan(tmp_path, plan)  # the same plan again: the same command goes on
    written = json.loads((tmp_path / "plan.json").read_text())  # the world by its flags, as before the choice
    assert "world" not in written["plan"] and written["world"] == list(ablate.WORLDS["counting"].flags)
    with pytest.raises(data.DataError, match="--world"):
        ablate.same_plan(tmp_path, replace(plan, world="five"))
    summary = {"command": "python ablate.py x --world counting", "plan": {"world": "counting", "samples": 4},
               "title": "Ablation: 1 arms, 100 held-out questions (--world counting)",
               "categories": ["counting"], "questions": 100, "runs_per_arm": 2, "seconds": 60.0,
               "base": {"greedy": 0.1, "pass1": 0.2, "maj": 0.3, "blind": 0.1, "by_category": {"counting": 0.1}},
               "arms": {"method": {"mean": 0.5, "ci95": [0.4, 0.6], "pass1": 0.5, "maj": 0.5, "blind": 0.2,
                                   "by_category": {"counting": 0.5}, "paired_diff": None,
                                   "curation": [{"iteration": 1, "silver_accuracy": 0.7, "kept": 90,
                                                 "candidates": 192, "mix": {"counting": 1.0}}]}}}
    table = ablate.markdown(summary)
    assert "| arm | counting |" in table and "| method | 50.0 |" in table and "colour" not in table


# -----------------------------------------------------------------------------
# The controls

def _records(scenes):
    """Kept candidates on two scenes, with answers as grade_candidates leaves them."""
    questions = ["How many red shapes are there?", "What colour is the square?", "What colour is the circle?"]
    records = [{"image": image, "valid": True, "kept": True, "question": q, "silver": "9", "answers": []}
               for image in scenes for q in questions]
    data.grade_candidates(records, scenes)
    return records


SCENES = {"a.png": data.Scene(112, 112, data.BACKGROUND, [data.Shape("circle", "red", 28, 28, 42),
                                                        data.Shape("square", "red", 84, 28, 42)]),
          "b.png": data.Scene(112, 112, data.BACKGROUND, [data.Shape("square", "blue", 28, 84, 42)])}


def test_oracle_labels_are_the_true_answers_and_drop_the_unanswerable():
    records = _records(SCENES)
    data.oracle_labels(records)
    kept = [(r["image"], r["question"], r["silver"]) for r in records if r["kept"]]
    assert kept == [("a.png", "How many red shapes are there?", "2"), ("a.png", "What colour is the square?", "red"),
                    ("a.png", "What colour is the circle?", "red"), ("b.png", "How many red shapes are there?", "0"),
                    ("b.png", "What colour is the square?", "blue")]
    assert data.grade_candidates(records, SCENES)["silver_accuracy"] == 1.0


def test_null_labels_are_uniform_over_the_answer_space_whatever_the_image():
    """Over many draws each answer of the category comes up about equally often (counts 0..2: the most
    shapes of a scene here is 2; colours: the two the scenes use), on either image."""
    draws = {}
    rng = np.random.default_rng(0)
    for _ in range(600):
        records = _records(SCENES)
        data.null_labels(records, SCENES, rng)
        for r in records:
            if r["kept"]:
                draws.setdefault(r["category"], []).append(r["silver"])
    assert sorted(set(draws["counting"])) == ["0", "1", "2"] and sorted(set(draws["colour"])) == ["blue", "red"]
    for category, values in draws.items():
        counts = np.unique(values, return_counts=True)[1] / len(values)
        assert np.allclose(counts, 1 / len(counts), atol=0.05), (category, counts)


def test_answer_space_covers_every_answer_the_benchmark_asks_for():
    world = pretrain.load_config(ablate.WORLDS["five"].base).world()
    for r in data.shapes_benchmark(300, seed=5, categories=data.CATEGORIES, **world):
        assert r["answer"] in data.answer_space(r["category"], world["max_shapes"], world["colours"])


def test_no_difficulty_pays_every_confidence_the_same():
    assert {uncertainty_reward(c, "none") for c in (0.0, 0.3, 0.5, 1.0)} == {1.0}


def test_oracle_labels_need_a_shapes_folder(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    code = selfplay.main(["--model", "tiny", "--images", str(tmp_path / "photos"), "--output", str(tmp_path / "run"),
                          "--silver-labels", "oracle"])
    assert code == 2 and "needs the true answers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# The five-category world

def test_two_sizes_lets_every_category_be_asked():
    world = pretrain.load_config(ablate.WORLDS["five"].base).world()
    asked = {q["category"] for seed in range(40)
             for q in data.scene_questions(data.make_scene(seed, **world), np.random.default_rng(seed))}
    assert asked == set(data.CATEGORIES)
    plain = dict(world, two_sizes=False)
    assert "size" not in {q["category"] for seed in range(40) for q in
                          data.scene_questions(data.make_scene(seed, **plain), np.random.default_rng(seed))}


def test_the_questioner_has_room_for_every_question_of_the_world():
    """The shared question budget holds the longest question the base was taught to write, its tags
    and end token (a size question is 27 tokens: with 24 the Questioner could never ask one)."""
    budget = ablate.settings(ablate.FULL)["question_max_tokens"]
    tokenizer, _ = load_processors(ablate.WORLDS["five"].base)
    world, rng = pretrain.load_config(ablate.WORLDS["five"].base).world(), np.random.default_rng(0)
    asked = [q for seed in range(200) for q in data.scene_questions(data.make_scene(seed, **world), rng)]
    _, mask = pretrain.target_batch(tokenizer, [pretrain.question_target(q["question"]) for q in asked])
    lengths = mask.sum(dim=1).tolist()  # each target's tokens, <|im_end|> included
    assert {q["category"] for q in asked} == set(data.CATEGORIES) and max(lengths) <= budget


def test_the_planted_skew_is_what_the_flags_say():
    """Reasoner rows guess only in --guess-categories; Questioner rows ask the other categories more often
    with --questioner-skew than without it."""
    cfg = pretrain.parse(pretrain.Config, [*ablate.WORLDS["five"].flags, "--questioner-share", "0.5"])
    rows = pretrain.rows(cfg, np.random.default_rng(0), 2000)
    guessed = {data.question_category(q) for q in _questions(rows, guess=True)}
    assert guessed == {"counting", "arithmetic"}
    mastered = lambda c: np.mean([data.question_category(q) not in ("counting", "arithmetic")
                                  for q in _asked(pretrain.rows(c, np.random.default_rng(0), 2000))])
    plain_cfg = pretrain.parse(pretrain.Config, [*ablate.WORLDS["five"].flags, "--questioner-share", "0.5",
                                                 "--questioner-skew", "0"])
    skewed, plain = mastered(cfg), mastered(plain_cfg)
    assert skewed > plain + 0.3 * (1 - plain)


def _asked(rows):
    return [t.removeprefix("<question>").removesuffix("</question>") for _, _, t, _ in rows
            if t.startswith("<question>")]


def _questions(rows, guess):
    from reasoner import reasoner_prompt
    head, tail = reasoner_prompt("@").split("@")
    return [p.removeprefix(head).removesuffix(tail) for _, p, t, _ in rows
            if not t.startswith("<question>") and ("<think>guess</think>" in t) == guess]


# -----------------------------------------------------------------------------
# The summary, from a fake OUT (what evaluate.py and selfplay.py would have written)

def _evaluated(folder, model, greedy, full=True):
    """evaluate.py's results.json and samples for one model whose greedy verdicts are `greedy`;
    full=False: greedy alone, as ablate.py evaluates a curve (no pass@1, maj@m or blind)."""
    from evaluate import safe_name
    rows = [{"category": data.CATEGORIES[i % 5], "correct": bool(g), "sampled_correct": [bool(g), False],
             "majority_correct": bool(g)} for i, g in enumerate(greedy)]
    (folder / "samples" / safe_name(str(model))).mkdir(parents=True, exist_ok=True)
    (folder / "samples" / safe_name(str(model)) / "heldout.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"benchmarks": {"heldout": {"models": {}}}}
    acc = float(np.mean(greedy))
    results["benchmarks"]["heldout"]["models"][str(model)] = {"accuracy": acc} | (
        {"pass1": {"accuracy": acc / 2}, "maj": {"accuracy": acc}, "blind": {"accuracy": 0.1}} if full else {})
    path.write_text(json.dumps(results))


def test_the_summary_pairs_each_arm_with_the_method_run_by_run(tmp_path):
    """Two seeds; the method right on 4 and 6 of 10 questions after its first iteration, 8 and 6
    after its second; one_iteration is its first iteration (a shortened run, not trained again):
    the means, the curve, the paired difference ((4-8) + (6-6)) / 20 = -0.2 and the curation mix
    come out of the files as the arithmetic says."""
    Q = 10
    right = lambda n: [1] * n + [0] * (Q - n)
    _evaluated(tmp_path / "eval" / "bases" / "seed_0", ablate.base_folder(ablate.QUICK, tmp_path, 0), right(2))
    first, second = {0: 4, 1: 6}, {0: 8, 1: 6}
    methods = [ablate.Run("method", seed, 0) for seed in (0, 1)]
    shortened = [ablate.Run("one_iteration", seed, 0, "method", 1) for seed in (0, 1)]
    for run in methods:
        folder = tmp_path / "runs" / run.name
        metrics = []
        for k, n in ((1, first[run.seed]), (2, second[run.seed])):
            (folder / f"iter_{k}" / "reasoner").mkdir(parents=True)
            _evaluated(ablate.eval_folder(tmp_path, run, last=k == 2), folder / f"iter_{k}" / "reasoner", right(n),
                       full=k == 2)
            metrics.append({"phase": "curation", "iteration": k, "silver_accuracy": 0.5, "n_kept": 10 * k,
                            "n_candidates": 40, "categories": {"counting": 3, "colour": 1},
                            "kept_categories": {"counting": 1}})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for run in shortened:  # its last Reasoner is the method's first, evaluated in full in its own folder
        assert ablate.reasoners(tmp_path, run) == [tmp_path / "runs" / run.trained.name / "iter_1" / "reasoner"]
        assert ablate.eval_folder(tmp_path, run, last=True) == tmp_path / "eval" / run.name
        _evaluated(ablate.eval_folder(tmp_path, run, last=True), *ablate.reasoners(tmp_path, run),
                   right(first[run.seed]))
    runs = methods + shortened
    cfg = ablate.Config(out=str(tmp_path), bootstrap=500)
    summary = ablate.summarise(cfg, ablate.QUICK, tmp_path, runs, 1.0, "python ablate.py x")
    method, one = summary["arms"]["method"], summary["arms"]["one_iteration"]
    assert summary["categories"] == list(data.CATEGORIES) and set(method["by_category"]) == set(data.CATEGORIES)
    assert summary["base"]["greedy"] == pytest.approx(0.2)
    assert method["mean"] == pytest.approx(0.7) and one["mean"] == pytest.approx(0.5)
    assert [p["iteration"] for p in method["curve"]] == [0, 1, 2] and len(one["curve"]) == 2
    assert method["curve"][0]["mean"] == pytest.approx(0.2) and method["curve"][1]["mean"] == pytest.approx(0.5)
    assert method["paired_diff"] is None and one["paired_diff"]["mean"] == pytest.approx(-0.2)
    low, high = one["paired_diff"]["ci95"]
    assert low <= -0.2 <= high
    assert sorted(method["per_seed"]) == ["seed_0", "seed_1"] and method["per_seed"]["seed_0"]["greedy"] == 0.8
    assert method["curation"][1]["kept"] == 20 and method["curation"][0]["mix"]["counting"] == pytest.approx(0.75)
    assert [c["kept"] for c in one["curation"]] == [10]  # the method's first iteration only
    table = ablate.markdown(summary)
    assert table.startswith("# Ablation: 2 arms, 10 held-out questions (--world five)\n")
    assert "| one_iteration | 50.0 |" in table and "| -20.0 |" in table


def test_a_script_runs_in_the_worker_its_output_and_exit_code_kept(tmp_path, capsys):
    """ablate.script runs a script's main in this process: what it prints goes to the log (and
    not to this process's output), a user error returns False, --help True."""
    log = tmp_path / "logs" / "run.log"
    assert not ablate.script(["selfplay.py", "--images", tmp_path / "none", "--output", tmp_path / "run"], log)
    assert ablate.script(["evaluate.py", "--help"], log)
    text = log.read_text()
    assert "error:" in text and "usage:" in text and not (tmp_path / "run").exists()
    out, err = capsys.readouterr()
    assert "error:" not in out + err


def test_a_worker_the_os_kills_ends_the_table_with_one_message_not_a_hang():
    """A worker that dies mid-task (here os._exit, as the OS's out-of-memory killer would end it)
    stops run_tasks with a message saying so and how to go on, where a Pool would wait forever."""
    cfg = ablate.Config(out="x", jobs=1)
    with ablate.workers(cfg) as pool:
        with pytest.raises(SystemExit) as stop:
            ablate.run_tasks(pool, [(str, ("",)), (os._exit, (9,))], "tasks")
    assert "worker process died" in str(stop.value) and "run the same command again" in str(stop.value)
