"""Tests for evaluate.py: the scoring rules, each benchmark adapter on its fixture, the shapes
records, the Wilson interval, and the command line end to end on two tiny models."""

import base64
import importlib.util
import io
import json
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
from evaluate import EvalConfig, extract_prediction, inline_choices, make_record, score, wilson_interval
from model import ModelError, encode_prompts, load_vlm, resolve_device
from reasoner import reasoner_prompt
from machinery.keys import prompt_keys
from sampler import sample
from tools import pretrain

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
OURS = FIXTURES / "ours" / "questions.jsonl"
# The flat colours the fixture images are painted with (see fixtures/benchmarks/README.md).
RED, GREEN, BLUE, YELLOW = (230, 25, 25), (30, 160, 50), (30, 70, 230), (245, 210, 0)
PURPLE, BLACK, WHITE, ORANGE = (140, 50, 170), (0, 0, 0), (255, 255, 255), (245, 130, 20)
MC = "multiple-choice"
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def png_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# Scoring rules

IMAGE = Image.new("RGB", (32, 32), RED)
RECORDS = {
    "mc": make_record("mc", IMAGE, "Which colour?", "B", "c", choices=["red", "blue", "green"]),
    "mc_text_gold": make_record("t", IMAGE, "Which colour?", "blue", "c", choices=["red", "blue", "green"]),
    "mc_inline": make_record("i", IMAGE, "How many?\nOptions: A: 2, B: 3, C: 4, D: 5", "C", "c",
                             choices=["2", "3", "4", "5"], choices_in_question=True),
    "mc_unparsed": make_record("u", IMAGE, "Answer the question in the image.", "A", "c",
                               choices_in_question=True),
    "integer": make_record("n", IMAGE, "How many?", "12", "c"),
    "decimal": make_record("d", IMAGE, "How long?", "1.73", "c"),
    "half": make_record("h", IMAGE, "What share?", "0.5", "c"),
    "yes": make_record("y", IMAGE, "Is it red?", "yes", "c"),
    "text": make_record("x", IMAGE, "What colour?", "red", "c"),
}

SCORING_CASES = [  # (record, extracted prediction, right?)
    ("mc", "B", True), ("mc", "b", True), ("mc", "(B)", True), ("mc", "B. blue", True),
    ("mc", "blue", True), ("mc", "Blue.", True), ("mc", r"\text{blue}", True),
    ("mc", "A", False),  # wrong letter
    ("mc", "red", False), ("mc", "green", False),  # another option's text
    ("mc", "D", False),  # a letter past the last option
    ("mc", "B or C", False), ("mc", "purple", False), ("mc", "", False),
    ("mc_text_gold", "B", True), ("mc_text_gold", "blue", True), ("mc_text_gold", "A", False),
    ("mc_inline", "C", True), ("mc_inline", "4", True), ("mc_inline", "4.0", True),
    ("mc_inline", "3", False), ("mc_inline", "B", False),
    ("mc_unparsed", "A", True), ("mc_unparsed", "(a)", True), ("mc_unparsed", "B", False),
    ("integer", "12", True), ("integer", "12.0", True), ("integer", "+12", True),
    ("integer", "13", False), ("integer", "12.1", False),  # counts match exactly, not within 1%
    ("integer", "twelve", False), ("integer", "1,2", False), ("integer", "", False),
    ("decimal", "1.73", True), ("decimal", "1.732", True),  # 0.1% off
    ("decimal", "1.75", False), ("decimal", "1.7", False),  # 1.2% and 1.7% off
    ("half", "1/2", True), ("half", r"\frac{1}{2}", True), ("half", ".50", True), ("half", "0.6", False),
    ("yes", "yes", True), ("yes", "Yes.", True), ("yes", "true", True),
    ("yes", "no", False), ("yes", "false", False), ("yes", "yes, it is", False), ("yes", "", False),
    ("text", "Red", True), ("text", r"\text{red}", True), ("text", "red.", True),
    ("text", "blue", False), ("text", "a red one", False), ("text", "", False),
]


@pytest.mark.parametrize("key, prediction, right", SCORING_CASES)
def test_scoring_rules(key, prediction, right):
    assert score(RECORDS[key], prediction) is right


def test_whole_numbers_with_a_unit_sign_must_match_exactly():
    for gold, right, wrong in (("50%", "50", "50.4"), ("146°", "146", "145.5"), ("100%", "100%", "99.5")):
        record = make_record("u", IMAGE, "How much?", gold, "c")
        assert score(record, right) and not score(record, wrong), gold
    assert score(make_record("d", IMAGE, "How long?", "12.5%", "c"), "12.45")  # not whole: within 1%


def test_a_large_count_must_match_exactly():
    """1000001 is within 1e-6 of 1000000, but a count is right or wrong."""
    record = make_record("m", IMAGE, "How many?", "1000000", "c")
    assert score(record, "1,000,000") and score(record, "1e6")
    assert not score(record, "1000001") and not score(record, "999999")


def test_records_get_the_answer_type_that_picks_their_rule():
    types = {key: (r.answer_type, r.answer) for key, r in RECORDS.items()}
    assert types == {"mc": (MC, "B"), "mc_text_gold": (MC, "B"), "mc_inline": (MC, "C"),
                     "mc_unparsed": (MC, "A"), "integer": ("number", "12"), "decimal": ("number", "1.73"),
                     "half": ("number", "0.5"), "yes": ("yes-no", "yes"), "text": ("text", "red")}
    # separate choices are shown to the model under the question; inline ones are not repeated
    assert RECORDS["mc"].question == "Which colour?\nA. red\nB. blue\nC. green"
    assert RECORDS["mc_inline"].question == "How many?\nOptions: A: 2, B: 3, C: 4, D: 5"


@pytest.mark.parametrize("response, prediction", [
    (r"<think>red or blue</think> so \boxed{B}", "B"),
    (r"\boxed{1} no wait \boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # the last box
    ("no box at all", "no box at all"),  # the paper's fallback: the first 100 characters
    ("x" * 150, "x" * 100),
    (r"\boxed{}", ""),
    (r"cut off \boxed{3", r"cut off \boxed{3"),  # an unclosed box is no box
])
def test_prediction_is_the_last_box_else_the_first_100_characters(response, prediction):
    assert extract_prediction(response) == prediction


def test_an_unboxed_sentence_is_not_read_by_the_rules():
    assert score(RECORDS["mc"], extract_prediction("B"))
    assert not score(RECORDS["mc"], extract_prediction("The answer is B"))  # a judge might accept it


def test_a_judge_replaces_the_rules():
    seen = []

    def judge(record, prediction):
        seen.append((record.id, prediction))
        return prediction == "azure"

    assert score(RECORDS["mc"], "azure", judge=judge) is True
    assert score(RECORDS["mc"], "B", judge=judge) is False  # right by the rules, wrong by this judge
    assert seen == [("mc", "azure"), ("mc", "B")]


@pytest.mark.parametrize("question, choices", [
    ("How many?\nOptions: A: 2, B: 3, C: 4, D: 5", ["2", "3", "4", "5"]),
    ("What is the angle?\nChoices:\nA:30°\nB:60°\nC:90°", ["30°", "60°", "90°"]),
    ("Which way?\n\nA. Left\nB. Right\nC. Up", ["Left", "Right", "Up"]),
    ("Which is larger, (A) the red circle (B) the blue square", ["the red circle", "the blue square"]),
    ("Is point A. above the line?\nA) yes\nB) no", ["yes", "no"]),  # the last run of marks
    ("Is point A. above B?", []),
    ("How many shapes are there?", []),
])
def test_inline_choices(question, choices):
    assert inline_choices(question) == choices


# -----------------------------------------------------------------------------
# Benchmarks in the common record form

# (id, answer_type, answer, choices, category, skip, colour of the image or None)
EXPECTED = {
    "mmmu": [
        ("validation_Art_Theory_1", MC, "B", ["green", "red", "blue"], "Art_Theory", None, RED),
        ("validation_Math_2", "number", "5", [], "Math", None, GREEN),
        ("validation_Physics_3", MC, "A", ["<image 1>", "<image 2>"], "Physics", "several images", None)],
    "mathverse": [
        ("1", MC, "B", ["30°", "60°", "90°", "120°"], "Text Lite", None, PURPLE),
        ("2", "number", "2.5", [], "Vision Dominant", None, ORANGE),
        ("3", MC, "A", [], "Vision Only", None, BLACK)],
    "mathvision": [
        ("1", MC, "C", ["A circle", "A square", "A star"], "metric geometry - area", None, YELLOW),
        ("2", "number", "4", [], "counting", None, GREEN)],  # from the image path: no decoded_image
    "hallusionbench": [
        ("VD_illusion_0_0_0", "yes-no", "no", [], "illusion", None, WHITE),
        ("VD_illusion_0_0_1", "yes-no", "yes", [], "illusion", None, WHITE),
        ("VS_chart_1_0_0", "yes-no", "yes", [], "chart", "no image", None)],
    "realworldqa": [
        ("0", MC, "B", ["Left", "Right", "Up"], "all", None, ORANGE),
        ("1", "number", "3", [], "all", None, BLUE)],
    "visnumbench": [
        ("1", MC, "D", ["(90, 100) degrees", "(30, 40) degrees", "(170, 180) degrees", "(60, 70) degrees"],
         "Angle", None, BLACK),
        ("2", MC, "B", ["the cup", "the plate"], "Area", None, WHITE)],
    "mmvet": [
        ("v1_0", "text", "-1<AND>-5", [], "ocr+math", None, YELLOW),
        ("v1_1", "number", "2", [], "rec", None, RED)],
    "mmstar": [
        ("0", MC, "C", ["green", "yellow", "purple", "black"], "coarse perception", None, PURPLE),
        ("1", MC, "B", ["2", "3", "4", "5"], "fine-grained perception", None, GREEN)],
}


def load(spec, limit=None):
    return evaluate.load_benchmark(spec, limit)


def summary(record):
    colour = None if record.skip else evaluate.open_image(record).getpixel((0, 0))
    return record.id, record.answer_type, record.answer, record.choices, record.category, record.skip, colour


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_adapter_reads_its_fixture_into_records(name):
    bench = load(f"{name}={FIXTURES / name}")
    assert bench.name == name
    assert [summary(r) for r in bench.records] == EXPECTED[name]
    for r in bench.records:
        assert all(c in r.question for c in r.choices)  # the model sees every option


def test_adapter_question_texts():
    mmmu = load(f"mmmu={FIXTURES / 'mmmu'}").records
    assert mmmu[0].question == "<image 1> Which colour fills the picture?\nA. green\nB. red\nC. blue"
    vision_only = load(f"mathverse={FIXTURES / 'mathverse'}").records[2]
    assert vision_only.question == "Answer the question shown in the image."
    realworldqa = load(f"realworldqa={FIXTURES / 'realworldqa'}").records
    assert realworldqa[0].question == "Which way is the arrow pointing?\n\nA. Left\nB. Right\nC. Up"
    assert realworldqa[1].question == "How many cars are in the picture?"
    visnumbench = load(f"visnumbench={FIXTURES / 'visnumbench'}").records
    assert visnumbench[1].question == "Which object is the largest?\nA. the cup\nB. the plate"


def test_our_jsonl_format():
    bench = load(str(OURS))
    assert bench.name == "questions"
    assert [summary(r) for r in bench.records] == [
        ("red-square", "text", "red", [], "colour", None, RED),
        ("blue-choice", MC, "B", ["red", "blue"], "colour", None, BLUE),  # gold given as option text
        ("2", "number", "3", [], "all", "missing image file", None),  # id: the line's index
        ("no-answer", "text", "", [], "all", "no answer", None),
        ("count", "number", "1", [], "counting", None, BLUE)]
    assert bench.records[1].question == "What colour is the picture?\nA. red\nB. blue"
    assert bench.skipped() == {"missing image file": 1, "no answer": 1}
    assert [r.id for r in load(str(OURS), limit=2).records] == ["red-square", "blue-choice"]


def test_the_problem_answer_images_schema_reads_under_any_name():
    bench = load(f"hallusionbench={FIXTURES / 'problem_schema'}")
    assert [summary(r) for r in bench.records] == [
        ("0", "yes-no", "yes", [], "all", None, RED), ("1", MC, "A", ["red", "blue"], "all", None, RED)]
    assert bench.records[0].question == "Is there a red square in the image? Answer yes or no."


def test_open_image_reads_every_source_form_and_names_bad_ones(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(GREEN))
    good = [Image.new("RGB", (32, 32), GREEN), tmp_path / "a.png", png_bytes(GREEN),
            base64.b64encode(png_bytes(GREEN)).decode()]
    for source in good:
        assert evaluate.open_image(make_record("ok", source, "q", "a", "c")).getpixel((5, 5)) == GREEN
    for source in [b"not an image", base64.b64encode(b"not an image").decode(), "@@not base64@@"]:
        with pytest.raises(data.DataError, match="record 'bad'"):
            evaluate.open_image(make_record("bad", source, "q", "a", "c"))


def test_image_bytes_are_read_as_image_files_are(tmp_path):
    """Exports hold images as bytes; they get data.load_image's checks and conversions."""
    def encoded(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent: white, as from a file
    deep = Image.fromarray(np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (32, 1)))  # 12-bit in 16
    for image in (clear, deep):
        (tmp_path / "image.png").write_bytes(encoded(image))
        from_bytes = evaluate.open_image(make_record("b", encoded(image), "q", "a", "c"))
        assert np.array_equal(np.asarray(from_bytes), np.asarray(data.load_image(tmp_path / "image.png")))
    assert evaluate.open_image(make_record("b", encoded(clear), "q", "a", "c")).getpixel((5, 5)) == WHITE
    with pytest.raises(data.DataError, match="record 'strip': 2000x4 is too small"):
        evaluate.open_image(make_record("strip", encoded(Image.new("RGB", (2000, 4))), "q", "a", "c"))


def test_an_image_that_does_not_decode_is_skipped_and_counted(tiny, tmp_path):
    rows = [{"question_id": question_id, "image": {"bytes": base64.b64encode(image).decode(), "path": None},
             "question": "How many?", "answer": "1"}
            for question_id, image in (("bad", b"no png"), ("good", png_bytes(RED)))]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = load(f"mmvet={tmp_path}")
    cfg = EvalConfig(model=["tiny"], max_new_tokens=2, device="cpu", quiet=True)
    samples = evaluate.answer_benchmark(*tiny, bench, cfg, "tiny")
    assert [s["id"] for s in samples] == ["good"]
    assert bench.skipped() == {"unreadable image": 1}


def test_rows_of_another_schema_and_broken_files_are_data_errors(tmp_path):
    with pytest.raises(data.DataError, match=r"line 1: no field 'sample_index'"):
        load(f"mathverse={FIXTURES / 'ours'}")
    (tmp_path / "broken.jsonl").write_text('{"question": "ok", "answer": "1", "image": "a.png"}\n{not json\n')
    with pytest.raises(data.DataError, match="line 2: not JSON"):
        load(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no .jsonl or .parquet files"):
        load(f"mmstar={tmp_path / 'empty'}")
    for row, message in (([1, 2], "line 1: a list, not a record"),
                         ({"question": None, "answer": "1", "image": "a.png"}, "line 1: the question is NoneType"),
                         ({"question": "q", "answer": "A", "choices": "red, blue"}, "line 1: the choices are str"),
                         ({"question": "q", "answer": "1", "image": 5}, "line 1: the image is a int")):
        (tmp_path / "odd.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(data.DataError, match=message):
            load(str(tmp_path / "odd.jsonl"))


def test_records_that_cannot_be_scored_are_skipped_with_the_reason(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(RED))
    pets = {"question": "Which?", "choices": ["a dog", "a cat"], "image": "a.png"}
    rows = [{"id": "not-an-option", "answer": "cat", **pets}, {"id": "letter-past-the-options", "answer": "E", **pets},
            {"id": "base64-as-a-path", "question": "How many?", "answer": "2",
             "image": base64.b64encode(png_bytes(RED) * 40).decode()},  # far longer than a file name may be
            {"id": "fine", "answer": "a cat", **pets}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = {r.id: r for r in load(str(tmp_path / "q.jsonl")).records}
    assert records["not-an-option"].skip == records["letter-past-the-options"].skip == "answer not among the options"
    assert records["base64-as-a-path"].skip == "missing image file"
    assert records["fine"].answer == "B" and records["fine"].skip is None


@pytest.mark.skipif(HAS_DATASETS, reason="the messages below are for machines without `datasets`")
def test_without_datasets_parquet_and_hub_names_say_what_to_do(tmp_path):
    (tmp_path / "validation-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(data.DataError, match="optional `datasets` package"):
        load(f"mmmu={tmp_path}")
    with pytest.raises(data.DataError, match=r"lmms-lab/MMMU, split 'validation'.*--bench mmmu=PATH"):
        load("mmmu")


def test_shapes_records_carry_the_shapes_benchmark_answers():
    records = load("shapes").records
    reference = data.shapes_benchmark(500, seed=0)
    assert len(records) == len(reference) == 500
    expected_type = {"counting": "number", "arithmetic": "number", "spatial": "yes-no", "size": MC,
                     "colour": "text"}
    keys = ("id", "question", "answer", "category")
    for r, q in zip(records, reference):
        assert [getattr(r, k) for k in keys] == [q[k] for k in keys]
        assert r.skip is None
        assert r.image.tobytes() == q["image"].tobytes()
        assert r.answer_type == expected_type[r.category]
        assert r.choices == (q["choices"] or [])
        assert all(f"({letter}) {c}" in r.question for letter, c in zip("AB", r.choices))
    assert Counter(r.category for r in records) == {c: 100 for c in data.CATEGORIES}
    assert [r.id for r in load("shapes", limit=7).records] == [q["id"] for q in reference[:7]]


# -----------------------------------------------------------------------------
# Wilson interval and the table cell


def test_wilson_interval_against_hand_computed_values():
    # 117/500: p = .234, z²/n = .0076832; centre = (.234 + .0038416) / 1.0076832 = .236028,
    # half = 1.96·sqrt(.234·.766/500 + 3.8416/10⁶) / 1.0076832 = .037024
    low, high = wilson_interval(117, 500)
    assert low == pytest.approx(0.199004, abs=1e-5) and high == pytest.approx(0.273052, abs=1e-5)
    # 0/10: low 0, high = (z²/n) / (1 + z²/n) = .384146 / 1.384146
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-5)
    assert wilson_interval(0, 0) is None


def test_table_cell():
    samples = [{"correct": i < 117, "category": "c"} for i in range(500)]
    assert evaluate.cell(evaluate.summarize(samples, 1.0)) == "23.4 (117/500) [19.9, 27.3]"
    assert evaluate.cell(evaluate.summarize([], 0.0)) == "n/a (0/0)"


# -----------------------------------------------------------------------------
# Command line


def test_flags_are_generated_from_the_config_fields(capsys):
    assert evaluate.parse_args(["--model", "tiny"]) == EvalConfig(model=["tiny"])
    cfg = evaluate.parse_args(["--model", "a", "--model", "b@2", "--batch-size", "3", "--limit", "5",
                               "--quiet", "--dtype", "bfloat16", "--min-pixels", "100", "--output", "x"])
    assert (cfg.model, cfg.batch_size, cfg.limit, cfg.quiet, cfg.dtype, cfg.min_pixels, cfg.output) == (
        ["a", "b@2"], 3, 5, True, "bfloat16", 100, "x")
    assert EvalConfig(model=["m"]).max_new_tokens == 2048  # the paper's
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    help = capsys.readouterr().out
    assert all("--" + f.name.replace("_", "-") in help for f in fields(EvalConfig))
    bench_help = next(f for f in fields(EvalConfig) if f.name == "bench").metadata["help"]
    assert all(name in bench_help for name in evaluate.BENCHMARKS)


def test_model_specs():
    assert evaluate.model_source("tiny@3", 0) == ("tiny", 3)
    assert evaluate.model_source("tiny", 5) == ("tiny", 5)
    assert evaluate.model_source("random-3b@2", 0) == ("random-3b", 2)
    assert evaluate.model_source("runs/x/iter_2/reasoner", 0) == ("runs/x/iter_2/reasoner", 0)
    with pytest.raises(ModelError, match="whole number"):
        evaluate.model_source("tiny@x", 0)


def test_cli_two_tiny_models_on_shapes_and_a_fixture(tmp_path, capsys):
    argv = ["--model", "tiny", "--model", "tiny@1", "--bench", f"shapes,{OURS}", "--limit", "4",
            "--max-new-tokens", "8", "--batch-size", "3", "--device", "cpu", "--output", str(tmp_path),
            "--quiet"]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| benchmark | tiny | tiny@1 | skipped |"
    assert lines[2].startswith("| shapes | ") and lines[2].endswith(" | 0 |")
    assert lines[3].startswith("| questions | ")
    assert lines[3].endswith(" | 1 missing image file, 1 no answer |")
    *table_lines, done = table.strip().splitlines()
    assert done == f"done: {tmp_path} (results.json, table.md, samples/)", "it says where it wrote"
    assert (tmp_path / "table.md").read_text().strip() == "\n".join(table_lines)

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model"] == ["tiny", "tiny@1"] and results["config"]["max_new_tokens"] == 8
    predictions = {}
    for bench, ids in (("shapes", [q["id"] for q in data.shapes_benchmark(500)[:4]]),
                       ("questions", ["red-square", "blue-choice"])):
        records = {r.id: r for r in load(str(OURS) if bench == "questions" else "shapes", 4).records}
        for model in ("tiny", "tiny@1"):
            path = tmp_path / "samples" / model / f"{bench}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert [row["id"] for row in rows] == ids
            result = results["benchmarks"][bench]["models"][model]
            assert result["scored"] == len(ids) and result["correct"] == sum(row["correct"] for row in rows)
            for row in rows:
                record = records[row["id"]]
                assert row["prompt"] == reasoner_prompt(record.question) and row["gold"] == record.answer
                assert row["extracted"] == extract_prediction(row["prediction"])
                assert row["correct"] == score(record, row["extracted"])
            predictions[model, bench] = [row["prediction"] for row in rows]
    assert predictions["tiny", "shapes"] != predictions["tiny@1", "shapes"]  # another seed, another model
    # each answer is the model's greedy answer to that question about its own image, asked alone
    model, tok, ip = load_vlm("tiny", seed=0)
    asked = [r for r in load(str(OURS), 4).records if r.skip is None]  # two questions, two different images
    for record, prediction in zip(asked, predictions["tiny", "questions"], strict=True):
        prompts = encode_prompts(tok, ip, [evaluate.open_image(record)], [reasoner_prompt(record.question)])
        alone = sample(model, prompts, max_new_tokens=8, temperature=0.0).texts(tok)[0]
        assert prediction == alone, record.id


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--bench", "nope"], "unknown benchmark 'nope'"),
    (["--model", "tiny", "--bench", "mmstar=/no/such/folder"], "'/no/such/folder' does not exist"),
    (["--model", "./no-such-model", "--bench", "shapes", "--limit", "1"], "'./no-such-model' does not exist"),
    (["--model", "tiny@x", "--bench", "shapes", "--limit", "1"], "'tiny@x': the seed after @"),
    (["--model", "tiny", "--model", "./no-such-model", "--bench", "shapes", "--limit", "1"],
     "'./no-such-model' does not exist"),  # found before the first model spends its time
    (["--model", "tiny", "--bench", f"shapes,{OURS},shapes"], "benchmark 'shapes' is given twice"),
    (["--model", "tiny", "--model", "tiny", "--bench", "shapes"], "model 'tiny' is given twice"),
    (["--model", "tiny", "--bench", "mmmu="], "--bench 'mmmu=': no path after '='"),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert evaluate.main(argv + ["--device", "cpu", "--output", str(tmp_path), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("evaluate.py: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not any(tmp_path.iterdir()), "nothing is written before every check has passed"


def one_line_error(argv, capsys):
    """evaluate.main(argv) -> its one-line error, checked to be one line with exit code 2."""
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("evaluate.py: error: ") and captured.err.count("\n") == 1 and captured.out == ""
    return captured.err


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: no CUDA GPU here; pass --device cpu (or auto)"),  # the README's own example
    ("cuda:1", "--device cuda:1: no CUDA GPU here; pass --device cpu"),
    ("gpu", "--device gpu: unknown device; pass auto, cpu, cuda or cuda:N"),
])
def test_a_device_that_is_not_here_is_one_line(device, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--model", "tiny", "--bench", "shapes", "--limit", "1", "--quiet", "--output", str(tmp_path / "out"),
            "--device", device]
    assert message in one_line_error(argv, capsys)
    assert not any(tmp_path.iterdir())


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(name) for name in ("auto", "cpu", "CUDA", "cuda:1")] == [
        torch.device("cuda"), torch.device("cpu"), torch.device("cuda"), torch.device("cuda:1")]
    with pytest.raises(ModelError, match=r"^--device cuda:2: only cuda:0 to cuda:1 are here; pass one of them$"):
        resolve_device("cuda:2")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_the_device_a_run_used_is_in_its_results(tmp_path, capsys):
    argv = ["--model", "tiny", "--bench", "shapes", "--limit", "1", "--max-new-tokens", "2", "--quiet",
            "--output", str(tmp_path), "--device", "auto"]
    assert evaluate.main(argv) == 0
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert json.loads((tmp_path / "results.json").read_text())["config"]["device"] == expected


def test_a_jsonl_that_is_not_utf8_names_its_line(tmp_path, capsys):
    (tmp_path / "q.jsonl").write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(data.DataError, match=r"q.jsonl' line 2: not UTF-8 text \(byte 0xe9 at column 18\); save"):
        load(str(tmp_path / "q.jsonl"))
    argv = ["--model", "tiny", "--bench", str(tmp_path / "q.jsonl"), "--device", "cpu", "--quiet",
            "--output", str(tmp_path / "out")]
    assert "line 2: not UTF-8" in one_line_error(argv, capsys) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_a_benchmark_without_rows_is_an_error(text, tmp_path, capsys):
    (tmp_path / "none.jsonl").write_text(text)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "test.jsonl").write_text(text)
    with pytest.raises(data.DataError, match="none.jsonl': no questions in it"):
        load(str(tmp_path / "none.jsonl"))
    argv = ["--model", "tiny", "--bench", f"mmstar={tmp_path / 'folder'}", "--device", "cpu", "--quiet",
            "--output", str(tmp_path / "out")]
    assert "no questions in it (no rows)" in one_line_error(argv, capsys) and not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_before_any_model_runs(tmp_path, capsys):
    (tmp_path / "results").write_text("an old file")
    argv = ["--model", "tiny", "--bench", "shapes", "--limit", "1", "--device", "cpu", "--quiet",
            "--output", str(tmp_path / "results")]
    assert evaluate.main(argv) == 2
    assert "'" + str(tmp_path / "results") + "' is a file, not a folder" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The blind baseline, pass@1 at temperature 1 and maj@m


@pytest.mark.parametrize("n", range(0, 12))
def test_the_derangement_moves_every_image_and_is_fixed_by_its_seed(n):
    images = [f"{i}.png" for i in range(n)]
    for seed in range(20):
        perm = evaluate.derangement(images, seed)
        assert sorted(perm) == list(range(n))
        assert perm == evaluate.derangement(images, seed)
        assert n < 2 and perm == list(range(n)) or all(perm[i] != i for i in range(n))
    if n >= 4:
        assert len({tuple(evaluate.derangement(images, seed)) for seed in range(20)}) > 1  # the seed matters


def test_the_derangement_shows_no_question_a_copy_of_its_own_picture(tmp_path):
    """Several questions about one figure (HallusionBench): none is shown that figure again."""
    for images in ([Path("a.png"), Path("a.png"), Path("b.png"), Path("c.png"), Path("c.png"), Path("c.png"),
                    Path("d.png")],
                   [Image.new("RGB", (8, 8), c) for c in (RED, RED, GREEN, GREEN, BLUE)],  # equal pixels, two objects
                   [png_bytes(RED), png_bytes(RED), png_bytes(GREEN), png_bytes(BLUE)]):
        for seed in range(30):
            perm = evaluate.derangement(images, seed)
            assert sorted(perm) == list(range(len(images)))
            assert not any(evaluate.same_image(images[i], images[j]) for i, j in enumerate(perm)), (images, seed)
    assert evaluate.derangement([Path("a.png")] * 3, 0) != [0, 1, 2]  # no way around it: at least another record


def colour_records(colours):
    return evaluate.Benchmark("colours", [make_record(f"q{i}", Image.new("RGB", (32, 32), c), f"Question {i}?",
                                                      "1", "c") for i, c in enumerate(colours)])


def fake_answers(shown, responses=lambda question, colour, n, seed: ["\\boxed{1}"] * n):
    """A stand-in for evaluate.answer_batch: records (question, colour of its image, n, seed) in
    `shown`, once greedy (n = 1, seed None) and with m > 0 once for the samples (n = m, seed the
    pair's random key), and answers with responses(question, colour, n, seed)."""
    def answer_batch(model, tokenizer, image_processor, images, prompts, *, max_new_tokens, m=0, keys=None):
        greedy, sampled = [], []
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            question, colour = prompt.split("\n")[0], image.getpixel((0, 0))
            shown.append((question, colour, 1, None))
            greedy += responses(question, colour, 1, None)
            if m:
                shown.append((question, colour, m, int(keys.values[i])))
                sampled += responses(question, colour, m, int(keys.values[i]))
        return greedy, sampled
    return answer_batch


def test_the_blind_run_asks_each_question_with_another_records_image(monkeypatch):
    colours = [RED, GREEN, BLUE, YELLOW, PURPLE, BLACK, WHITE]
    bench = colour_records(colours)
    shown = []
    monkeypatch.setattr(evaluate, "answer_batch", fake_answers(shown))
    cfg = EvalConfig(model=["x"], batch_size=3, quiet=True, eval_seed=5)
    real = evaluate.answer_benchmark(None, None, None, bench, cfg, "x")
    assert shown == [(f"Question {i}?", c, 1, None) for i, c in enumerate(colours)]
    shown.clear()
    blind = evaluate.answer_benchmark(None, None, None, bench, cfg, "x", blind=True)
    perm = evaluate.derangement([r.image for r in bench.records], 5)
    assert shown == [(f"Question {i}?", colours[perm[i]], 1, None) for i in range(len(colours))]
    assert all(colours[perm[i]] != c for i, c in enumerate(colours))
    assert [row["image_of"] for row in blind] == [f"q{j}" for j in perm]
    assert [row["id"] for row in blind] == [row["id"] for row in real] and "image_of" not in real[0]
    shown.clear()
    evaluate.answer_benchmark(None, None, None, bench, replace(cfg, eval_seed=6), "x", blind=True)
    assert [c for _, c, _, _ in shown] != [colours[j] for j in perm]  # another seed, another shuffle


def canned(question, colour, n, seed):
    """Greedy: right only on q0. Sampled (n = 4): the hand-computed cases of the test below."""
    if seed is None:
        return ["\\boxed{3}" if question == "How many?" else "\\boxed{9}"]
    assert n == 4
    return {"How many?": ["\\boxed{3}", "\\boxed{3}", "\\boxed{4}", "no box"],  # 2/4 right, majority 3: right
            "Which colour?": ["\\boxed{blue}", "\\boxed{red}", "\\boxed{blue}", "\\boxed{red}"],  # 2/4, tie: blue first
            "Pick one.": ["no box", "B", "none", "\\boxed{}"],  # 1/4 (by the fallback), no box: no majority
            }[question]


def test_pass_at_1_and_maj_at_m_from_canned_answers(monkeypatch):
    records = [make_record("q0", IMAGE, "How many?", "3", "counting"),
               make_record("q1", IMAGE, "Which colour?", "red", "colour"),
               make_record("q2", IMAGE, "Pick one.", "B", "counting", choices=["x", "y"])]
    shown = []
    monkeypatch.setattr(evaluate, "answer_batch", fake_answers(shown, canned))
    cfg = EvalConfig(model=["x"], batch_size=2, samples=4, quiet=True, eval_seed=1)
    rows = evaluate.answer_benchmark(None, None, None, evaluate.Benchmark("b", records), cfg, "x")
    keys = prompt_keys(1, "samples", n=3).values.tolist()  # each question its own stream, whatever its batch
    assert [(q, n, seed) for q, _, n, seed in shown if seed is not None] == [
        ("How many?", 4, keys[0]), ("Which colour?", 4, keys[1]), ("Pick one.", 4, keys[2])]
    assert [row["sampled_correct"] for row in rows] == [[True, True, False, False], [False, True, False, True],
                                                        [False, True, False, False]]
    assert [row["sampled_extracted"][:2] for row in rows] == [["3", "3"], ["blue", "red"], ["no box", "B"]]
    assert [(row["majority"], row["majority_correct"]) for row in rows] == [("3", True), ("blue", False),
                                                                           (None, False)]
    result = evaluate.summarize(rows, 1.0, m=4)
    assert (result["correct"], result["scored"]) == (1, 3)  # greedy stays the headline
    pass1 = result["pass1"]
    assert pass1["accuracy"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert (pass1["m"], pass1["scored"], pass1["right_samples"]) == (4, 3, 5)
    assert pass1["wilson95"] == pytest.approx(wilson_interval(1.25, 3))
    assert pass1["by_category"] == {"counting": {"accuracy": pytest.approx(0.375), "scored": 2},
                                    "colour": {"accuracy": 0.5, "scored": 1}}
    assert result["maj"] == {"m": 4, "correct": 1, "scored": 3, "accuracy": pytest.approx(1 / 3),
                             "wilson95": wilson_interval(1, 3),
                             "by_category": {"counting": {"correct": 1, "scored": 2},
                                             "colour": {"correct": 0, "scored": 1}}}
    assert "pass1" not in evaluate.summarize(rows, 1.0)


def test_results_and_table_carry_the_blind_pass1_and_maj_figures(tmp_path, monkeypatch, capsys):
    """Canned answers, right only when a question comes with its own image: blind scores 0."""
    questions = [("q0", RED, "How many?", "3", None), ("q1", GREEN, "Which colour?", "red", None),
                 ("q2", BLUE, "Pick one.", "B", ["x", "y"])]
    rows = []
    for id, colour, question, answer, choices in questions:
        (tmp_path / f"{id}.png").write_bytes(png_bytes(colour))
        rows.append({"id": id, "image": f"{id}.png", "question": question, "answer": answer, "category": "c",
                     **({"choices": choices} if choices else {})})
    (tmp_path / "canned.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = {question: colour for _, colour, question, _, _ in questions}

    def responses(question, colour, n, seed):
        return canned(question, colour, n, seed) if colour == own[question] else ["\\boxed{9}"] * n
    monkeypatch.setattr(evaluate, "answer_batch", fake_answers([], responses))
    out = tmp_path / "out"
    assert evaluate.main(["--model", "tiny", "--bench", str(tmp_path / "canned.jsonl"), "--samples", "4",
                          "--device", "cpu", "--quiet", "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    result = json.loads((out / "results.json").read_text())["benchmarks"]["canned"]["models"]["tiny"]
    assert set(result) == {"correct", "scored", "accuracy", "wilson95", "by_category", "seconds", "pass1", "maj",
                           "blind"}
    assert set(result["blind"]) == {"correct", "scored", "accuracy", "wilson95", "by_category", "seconds", "pass1",
                                    "maj"}
    assert (result["accuracy"], result["pass1"]["accuracy"], result["maj"]["accuracy"]) == pytest.approx(
        (1 / 3, 1.25 / 3, 1 / 3))
    blind, sampled_blind_result = result["blind"], result  # (result is reused for the runs below)
    assert (blind["accuracy"], blind["pass1"]["accuracy"], blind["maj"]["accuracy"], blind["scored"]) == (0, 0, 0, 3)

    def interval(low_high):
        return f"[{100 * low_high[0]:.1f}, {100 * low_high[1]:.1f}]"
    assert table[2] == f"| canned | 33.3 (1/3) {interval(wilson_interval(1, 3))} (blind 0.0) | 0 |"
    assert table[3] == f"| canned pass@1 (T=1, m=4) | 41.7 {interval(wilson_interval(1.25, 3))} (blind 0.0) |  |"
    assert table[4] == f"| canned maj@4 | 33.3 (1/3) {interval(wilson_interval(1, 3))} (blind 0.0) |  |"
    samples = [json.loads(line) for line in (out / "samples" / "tiny" / "canned.jsonl").read_text().splitlines()]
    assert [(s["id"], len(s["sampled"]), s["majority"]) for s in samples] == [("q0", 4, "3"), ("q1", 4, "blue"),
                                                                             ("q2", 4, None)]
    blind_rows = [json.loads(line) for line in
                  (out / "samples" / "tiny" / "blind" / "canned.jsonl").read_text().splitlines()]
    assert [s["id"] for s in blind_rows] == ["q0", "q1", "q2"]
    assert all(s["image_of"] != s["id"] and not s["correct"] for s in blind_rows)

    assert evaluate.main(["--model", "tiny", "--bench", str(tmp_path / "canned.jsonl"), "--no-blind", "--device",
                          "cpu", "--quiet", "--output", str(tmp_path / "plain")]) == 0
    table = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "plain" / "results.json").read_text())["benchmarks"]["canned"]["models"]["tiny"]
    assert set(result) == {"correct", "scored", "accuracy", "wilson95", "by_category", "seconds"}
    assert table[2] == f"| canned | 33.3 (1/3) {interval(wilson_interval(1, 3))} | 0 |" and len(table) == 6
    assert table[5] == f"done: {tmp_path / 'plain'} (results.json, table.md, samples/)"
    assert not (tmp_path / "plain" / "samples" / "tiny" / "blind").exists()

    # --no-blind-samples: the seen run as before, the blind run greedy only (no draws asked for)
    shown = []
    monkeypatch.setattr(evaluate, "answer_batch", fake_answers(shown, responses))
    assert evaluate.main(["--model", "tiny", "--bench", str(tmp_path / "canned.jsonl"), "--samples", "4",
                          "--no-blind-samples", "--device", "cpu", "--quiet", "--output", str(tmp_path / "bg")]) == 0
    table = capsys.readouterr().out.splitlines()
    greedy_blind = json.loads((tmp_path / "bg" / "results.json").read_text())["benchmarks"]["canned"]["models"]["tiny"]
    assert {k: v for k, v in greedy_blind.items() if k not in ("seconds", "blind")} == \
        {k: v for k, v in sampled_blind_result.items() if k not in ("seconds", "blind")}
    assert set(greedy_blind["blind"]) == {"correct", "scored", "accuracy", "wilson95", "by_category", "seconds"}
    assert (greedy_blind["blind"]["accuracy"], greedy_blind["blind"]["scored"]) == (0, 3)
    # seen: greedy then 4 draws per question; blind: greedy alone
    assert [(n, own[q] == colour) for q, colour, n, _ in shown] == [(1, True), (4, True)] * 3 + [(1, False)] * 3
    assert table[2] == f"| canned | 33.3 (1/3) {interval(wilson_interval(1, 3))} (blind 0.0) | 0 |"
    assert table[3] == f"| canned pass@1 (T=1, m=4) | 41.7 {interval(wilson_interval(1.25, 3))} |  |"
    assert table[4] == f"| canned maj@4 | 33.3 (1/3) {interval(wilson_interval(1, 3))} |  |"
    blind_rows = [json.loads(line) for line in
                  (tmp_path / "bg" / "samples" / "tiny" / "blind" / "canned.jsonl").read_text().splitlines()]
    assert all("sampled" not in s and s["image_of"] != s["id"] for s in blind_rows)


def test_sampled_answers_come_from_the_sampler_at_temperature_1(tiny):
    """answer_batch's draws: m per prompt, the same for the same seed, the full distribution."""
    model, tok, ip = tiny
    images = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE)]
    prompts = [reasoner_prompt("How many?"), reasoner_prompt("Which colour?")]
    draw = lambda seed: evaluate.answer_batch(model, tok, ip, images, prompts, max_new_tokens=6, m=3,
                                              keys=prompt_keys(seed, n=2))
    greedy, first = draw(7)
    assert len(first) == 6 and first == draw(7)[1] and first != draw(8)[1]
    assert len(set(first)) > 1  # a random tiny model at temperature 1 does not repeat itself
    assert evaluate.answer_batch(model, tok, ip, images, prompts, max_new_tokens=6) == (greedy, [])
    encoded = encode_prompts(tok, ip, images, prompts)
    assert greedy == sample(model, encoded, max_new_tokens=6, temperature=0.0).texts(tok)
    expected = sample(model, encoded, n=3, max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0,
                      keys=prompt_keys(7, n=2)).texts(tok)
    assert first == expected


SHAPES_BASE = Path(__file__).resolve().parents[1] / "examples" / "shapes_base"


def test_a_questions_answers_do_not_depend_on_its_batch():
    """Neither the questions beside one in its batch nor which of the batch's rows have stopped (on
    CPU evaluate.py stops computing them) change its answers: batch sizes 12 and 5 give the same
    responses, samples and verdicts, and they are the reference decoder's (sampler.CacheDecoder,
    all 12 questions in one call, every row to the end). On the shipped shapes model, whose answers
    stop at different lengths."""
    world = pretrain.load_config(SHAPES_BASE)
    questions = data.shapes_benchmark(12, seed=20000, categories=world.categories.split(","), **world.world())
    records = [make_record(q["id"], q["image"], q["question"], q["answer"], q["category"], choices=q["choices"] or [],
                           choices_in_question=bool(q["choices"])) for q in questions]
    model, tok, ip = load_vlm(str(SHAPES_BASE))
    bench, cfg = evaluate.Benchmark("shapes", records), EvalConfig(model=["base"], samples=4, max_new_tokens=40,
                                                                   quiet=True, batch_size=12)
    whole = evaluate.answer_benchmark(model, tok, ip, bench, cfg, "base")
    assert evaluate.answer_benchmark(model, tok, ip, bench, replace(cfg, batch_size=5), "base") == whole
    encoded = encode_prompts(tok, ip, [evaluate.open_image(r) for r in records],
                             [reasoner_prompt(r.question) for r in records])
    greedy = sample(model, encoded, max_new_tokens=40, temperature=0.0)
    sampled = sample(model, encoded, n=4, max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0,
                     keys=prompt_keys(cfg.eval_seed, "samples", n=12))
    assert [row["prediction"] for row in whole] == greedy.texts(tok)
    assert [text for row in whole for text in row["sampled"]] == sampled.texts(tok)
    lengths = torch.cat([greedy.mask.sum(1), sampled.mask.sum(1)])
    assert lengths.max() >= 2 * lengths.min()  # rows stop at different steps, so some were dropped early


def test_an_image_path_that_leaves_the_benchmarks_folder_is_refused_unless_asked(tmp_path):
    (tmp_path / "bench").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "outside.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "bench" / "inside.png")
    rows = [{"image": "inside.png", "question": "Colour?", "answer": "blue"},
            {"image": "../outside.png", "question": "Colour?", "answer": "red"}]
    (tmp_path / "bench" / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError, match=r"line 2: its image '.*outside.png' is outside the benchmark's folder"):
        evaluate.load_benchmark(str(tmp_path / "bench" / "q.jsonl"))
    absolute = dict(rows[1], image=str(tmp_path / "outside.png"))
    (tmp_path / "bench" / "q.jsonl").write_text(json.dumps(absolute) + "\n")
    with pytest.raises(data.DataError, match="outside the benchmark's folder"):
        evaluate.load_benchmark(str(tmp_path / "bench" / "q.jsonl"))
    bench = evaluate.load_benchmark(str(tmp_path / "bench" / "q.jsonl"), images_anywhere=True)
    assert evaluate.open_image(bench.records[0]).getpixel((0, 0)) == (255, 0, 0)
