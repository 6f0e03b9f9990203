"""pretrain.py: what the warm start teaches, and that its folder is a model every script loads."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
from tools import pretrain
from model import encode_prompts, load_vlm
from questioner import QUESTIONER_PROMPTS
from rewards import extract_boxed, parse_question

# a model and a run small enough for a test: a few steps of a 2-layer model
SMALL = ["--hidden", "32", "--layers", "1", "--vision-hidden", "32", "--vision-layers", "1", "--steps", "3",
         "--batch", "6", "--warmup", "1", "--eval-questions", "4", "--quiet"]


def scene_of(*shapes):
    return data.Scene(112, 112, data.BACKGROUND, [data.Shape(k, c, x, y, 42) for k, c, x, y in shapes])


def test_counting_is_a_checklist_with_a_running_count_other_questions_list_their_shapes():
    scene = scene_of(("square", "red", 84, 28), ("circle", "red", 28, 84), ("circle", "blue", 84, 84))
    assert pretrain.reasoning("How many red shapes are there?", scene) == \
        "<think>red circle yes 1, red square yes 2, red triangle no 2</think> \\boxed{2}"
    assert pretrain.reasoning("How many circles are there?", scene, colours=("red", "blue")) == \
        "<think>red circle yes 1, blue circle yes 2</think> \\boxed{2}"
    assert pretrain.reasoning("How many green triangles are there?", scene) == \
        "<think>green triangle no 0</think> \\boxed{0}"
    assert pretrain.reasoning("What colour is the square?", scene) == "<think>red square</think> \\boxed{red}"
    # a slip says the opposite of the image; the count and the answer follow the chain, not the truth
    always = pretrain.reasoning("How many red shapes are there?", scene, slip=1.0, rng=np.random.default_rng(0))
    assert always == "<think>red circle no 0, red square no 0, red triangle yes 1</think> \\boxed{1}"


def test_slips_are_as_frequent_as_asked_and_only_in_training_rows():
    cfg = pretrain.Config(slip=0.1, guess=0.0)
    steps = flipped = 0
    for image, prompt, target, scene in pretrain.rows(cfg, np.random.default_rng(1), 400):
        if prompt == QUESTIONER_PROMPTS["paper"]:
            continue
        question = prompt.split("\n\n")[0]
        clean = pretrain.reasoning(question, scene, cfg.colours.split(","))
        said = [step.split()[2] for step in target.split("<think>")[1].split("</think>")[0].split(", ")]
        truth = [step.split()[2] for step in clean.split("<think>")[1].split("</think>")[0].split(", ")]
        steps += len(said)
        flipped += sum(a != b for a, b in zip(said, truth))
        assert extract_boxed(target) == target.split("</think>")[0].split()[-1]  # the last count
    assert 0.07 < flipped / steps < 0.13


def test_guesses_are_as_frequent_as_asked_and_uniform_over_the_worlds_counts():
    cfg = pretrain.Config(guess=0.6, slip=0.0)
    counting = guesses = 0
    said = []
    for image, prompt, target, scene in pretrain.rows(cfg, np.random.default_rng(2), 600):
        question = prompt.split("\n\n")[0]
        if prompt == QUESTIONER_PROMPTS["paper"] or data.counted(question) is None:
            continue
        counting += 1
        if target.startswith("<think>guess</think>"):
            guesses += 1
            said.append(int(extract_boxed(target)))
        else:  # the rest are clean checklists, true to the scene
            assert extract_boxed(target) == data.true_answer(question, scene)
    assert 0.55 < guesses / counting < 0.65
    counts = np.bincount(said)  # every count of the world guessed, whatever the image, none much more often
    assert len(counts) == cfg.max_shapes + 1 and counts.min() > 0.6 * counts.max(), counts


def test_guesses_are_taught_in_the_last_guess_steps_steps_only():
    cfg = pretrain.Config(steps=10, guess_steps=3, guess=1.0, batch=40, questioner_share=0.0)
    rng = np.random.default_rng(0)
    for step in range(cfg.steps):
        guessed = [target.startswith("<think>guess</think>") for _, _, target, _ in pretrain.step_rows(cfg, rng, step)]
        assert all(guessed) if step >= 7 else not any(guessed), step


def test_every_training_row_is_a_role_prompt_with_a_target_true_to_its_scene():
    cfg = pretrain.Config(slip=0.0, guess=0.0, categories="counting,colour")
    rows = pretrain.rows(cfg, np.random.default_rng(0), 200)
    asked = {"questioner": 0, "reasoner": 0}
    for image, prompt, target, scene in rows:
        assert image.size == (112, 112) and np.array_equal(np.asarray(image), np.asarray(data.render(scene)))
        if prompt == QUESTIONER_PROMPTS["paper"]:
            question = parse_question(target)["question"]
            assert data.true_answer(question, scene) is not None  # it only ever sees answerable questions
            asked["questioner"] += 1
        else:
            question = prompt.split("\n\n")[0]
            assert prompt == pretrain.reasoner_prompt(question)
            assert extract_boxed(target) == data.true_answer(question, scene)
            asked["reasoner"] += 1
        assert data.question_category(question) in ("counting", "colour")
    assert 30 <= asked["questioner"] <= 70  # questioner_share 0.25 of 200


def test_the_tokenizer_covers_prompts_questions_and_answers_word_by_word():
    cfg = pretrain.Config()
    tokenizer = pretrain.build_tokenizer(cfg)
    for text in pretrain.corpus(cfg)[:300]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) <= len(text.split()) * 4  # whole words, not bytes
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("How many red circles are there?")["input_ids"])
    assert tokens[3:6] == ["Ġred", "Ġcircle", "s"]  # the plural shares the singular's token


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_same_seed_same_weights_and_the_folder_loads_as_a_model(tmp_path, capsys):
    torch.set_num_threads(1)
    assert pretrain.main(SMALL + ["--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (4 questions): greedy" in out and "shuffled" in out and "maj@8" in out
    assert "greedy / shuffled by category: counting" in out and "of those have an answer in their scene" in out
    assert pretrain.main(SMALL + ["--output", str(tmp_path / "b")]) == 0
    assert pretrain.main(SMALL + ["--output", str(tmp_path / "c"), "--seed", "1"]) == 0
    a, b, c = (weights(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    cfg = pretrain.load_config(tmp_path / "a")
    assert cfg == pretrain.Config(**{**json.loads((tmp_path / "a" / pretrain.CONFIG_FILE).read_text())})
    assert (cfg.steps, cfg.hidden, cfg.output) == (3, 32, str(tmp_path / "a"))
    model, tokenizer, processor = load_vlm(str(tmp_path / "a"))
    assert processor.size == {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}
    assert tokenizer.padding_side == "left" and tokenizer.chat_template is not None
    scene = data.make_scene(0, **cfg.world())
    prompts = encode_prompts(tokenizer, processor, [data.render(scene)], [pretrain.reasoner_prompt("How many circles are there?")])
    assert int((prompts.input_ids == model.config.image_token_id).sum()) == 16  # 112 x 112: 4 x 4 merged patches
    assert all(torch.equal(p, a[n]) for n, p in model.state_dict().items() if n in a)


@pytest.mark.parametrize("argv, needle", [
    (["--colours", "red,pink"], "--colours: unknown 'pink'"),
    (["--categories", "counting,taste"], "--categories: unknown 'taste'"),
    (["--min-shapes", "5", "--max-shapes", "3"], "--min-shapes 5 is above --max-shapes 3"),
    (["--grid", "2", "--max-shapes", "5"], "--max-shapes 5 does not fit a 2 x 2 grid"),
    (["--hidden", "48"], "multiples of 32"),
])
def test_settings_that_do_not_fit_are_one_line_errors(argv, needle, tmp_path, capsys):
    assert pretrain.main(argv + ["--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "x").exists()


def test_a_bad_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--steps", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--steps" in err


def test_the_check_at_the_end_scores_greedy_shuffled_pass1_and_majority(monkeypatch):
    cfg = pretrain.Config(eval_questions=3)
    records = pretrain.held_out(cfg, 3)
    truth = [r["answer"] for r in records]
    wrong = [str(int(t) + 1) for t in truth]  # counting only: the answers are counts

    def canned(model, tokenizer, processor, images, questions, n=1, temperature=0.0, **settings):
        if temperature == 0:  # greedy: right on the first question; shown shuffled images, never right
            if np.array_equal(np.asarray(images[0]), np.asarray(records[1]["image"])):
                return [[w] for w in wrong]
            return [[truth[0]], [wrong[1]], [wrong[2]]]
        # 4 samples: right 3 of 4 times (a right majority), twice (a tie, first seen wins), once
        return [[truth[0]] * 3 + [wrong[0]], [wrong[1], truth[1], truth[1], wrong[1]], [truth[2]] + [wrong[2]] * 3]

    monkeypatch.setattr(pretrain, "answers", canned)
    scores = pretrain.held_out_accuracy(cfg, None, None, None, m=4)
    by_category = scores.pop("by category")
    assert scores == pytest.approx({"greedy": 1 / 3, "shuffled": 0.0, "pass@1": 6 / 12, "maj@4": 1 / 3})
    assert by_category == {"counting": pytest.approx({"greedy": 1 / 3, "shuffled": 0.0})}


def test_the_by_category_check_splits_the_questions_by_their_category(monkeypatch):
    cfg = pretrain.Config(eval_questions=40, categories="counting,colour", guess=0.0)
    records = pretrain.held_out(cfg, 40)
    colour = [r["category"] == "colour" for r in records]
    assert 0 < sum(colour) < 40

    def canned(model, tokenizer, processor, images, questions, n=1, temperature=0.0, **settings):
        # right on every colour question and wrong on every count, shown any image
        return [[r["answer"] if r["category"] == "colour" else "9"] * n for r in records]

    monkeypatch.setattr(pretrain, "answers", canned)
    scores = pretrain.held_out_accuracy(cfg, None, None, None, m=2)
    assert scores["greedy"] == pytest.approx(sum(colour) / 40)
    assert scores["by category"] == {"counting": {"greedy": 0.0, "shuffled": 0.0},
                                     "colour": {"greedy": 1.0, "shuffled": 1.0}}


def test_answerable_questions_grades_the_questioners_samples_against_their_own_scenes(monkeypatch):
    cfg = pretrain.Config(categories="counting,colour,spatial,size,arithmetic", two_sizes=True)
    monkeypatch.setattr(pretrain.data, "render", lambda scene: scene)  # each "image" is its scene

    def canned(model, tokenizer, processor, images, prompts, n=1, **settings):
        assert (n, settings["temperature"], settings["top_p"]) == (4, 1.0, 0.95) and len(images) == 10
        assert len({repr(scene) for scene in images}) == 10  # fresh scenes, not one
        out = []
        for i, scene in enumerate(images):
            # per scene: one of its own questions, one of another scene's that this one cannot
            # answer, and two outputs that do not parse
            own = data.scene_questions(scene, np.random.default_rng(i))[0]["question"]
            other = next(q["question"] for j, o in enumerate(images) if j != i
                         for q in data.scene_questions(o, np.random.default_rng(j))
                         if data.true_answer(q["question"], scene) is None)
            out.append([f"<question>{own}</question>", f"<question>{other}</question>", "no tags",
                        "<question></question>"])
        return out

    monkeypatch.setattr(pretrain, "generate", canned)
    assert pretrain.answerable_questions(cfg, None, None, None, images=10) == (0.5, 0.5)
