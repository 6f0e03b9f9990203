"""Tests for report.py: a fake run folder in, one valid, self-contained, escaped HTML page out."""

import base64
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data
from tools import report

HOSTILE = '<script>alert(1)</script> & "quotes"'
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
N_CHARTS = 5  # reward, KL, completion length, curation per iteration, confidence histogram
# (and a sixth, the silver labels against the truth, for graded runs only)


class StrictChecker(HTMLParser):
    """Fails on any closing tag that doesn't close the last opened one; collects every attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.attrs, self.tables, self.text = [], [], {}, []
        self._row, self._cell, self._table = None, None, None

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, name, value or "") for name, value in attrs]
        if tag not in VOID_TAGS:
            self.stack.append(tag)
        if tag == "table":
            self._table = dict(attrs).get("id")
            self.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_startendtag(self, tag, attrs):  # <circle .../> in SVG: opened and closed at once
        self.attrs += [(tag, name, value or "") for name, value in attrs]

    def handle_endtag(self, tag):
        assert self.stack, f"</{tag}> closes nothing"
        assert self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1]}> (open: {self.stack})"
        self.stack.pop()
        if tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self.tables[self._table].append(self._row)

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def check_html(page):
    """Parse page strictly; return the checker with its attributes and tables."""
    checker = StrictChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], f"tags never closed: {checker.stack}"
    assert page.startswith("<!DOCTYPE html>")
    return checker


def assert_self_contained(page, checker):
    assert "<link" not in page and "<script" not in page and 'src="http' not in page
    for tag, name, value in checker.attrs:
        if name == "src":
            assert value.startswith("data:"), f"<{tag} src={value[:40]}>"
        if name == "href":
            assert value.startswith("#"), f"<{tag} href={value}>"


def thumbnail_rules(page) -> dict:
    """{CSS class: data URI} of the page's images, from the style in its head; each class defined once."""
    head = page.split("</head>", 1)[0]
    rules = re.findall(r'\.(img-\d+) \{ background-image: url\("(data:image/jpeg;base64,[^"]+)"\); \}', head)
    assert len(rules) == len(dict(rules)) == head.count("data:") == page.count("data:"), "an image written twice"
    return dict(rules)


def uses_of(page, css):
    """How many thumbnails on the page show the image of CSS class css."""
    return len(re.findall(rf'<div class="thumb(?: small)? {css}" role="img"', page))


def write_jsonl(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def candidate(image, question, kept, silver="3", confidence=0.5, answers=("3", "3", "4", None), **grades):
    return {"image": str(image), "question": question, "raw": f"<think>hmm</think><question>{question}</question>",
            "answers": list(answers), "responses": [f"so the answer is \\boxed{{{a}}}" for a in answers],
            "silver": silver, "confidence": confidence, "kept": kept, "valid": question is not None, **grades}


def graded(true_answer, category):
    """The fields data.grade_candidates adds to a candidate of a shapes-world image."""
    return {"true_answer": true_answer, "answerable": true_answer is not None, "category": category}


def step_line(phase, iteration, step, reward, **extra):
    return {"phase": phase, "iteration": iteration, "step": step, "reward_mean": reward, "reward_std": 0.1,
            "kl": 0.01 * step, "completion_len": 40 + step, "loss": 0.0, **extra}


@pytest.fixture
def run(tmp_path):
    """A two-iteration run: metrics of every phase (a null, a step logged twice, a truncated last line), hostile text,
    one real image asked about three times in iteration 1, one image that no longer exists, one that isn't an image;
    iteration 1's curation graded against the truth (as a shapes-world run's), iteration 2's not."""
    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"model": "tiny", "iterations": 2, "note": HOSTILE,
                                                     "sampling": {"top_p": 0.99}, "tau_low": 0.25,
                                                     "tau_high": 0.75}))
    real = tmp_path / "cat.png"
    Image.new("RGBA", (300, 120), (200, 30, 30, 128)).save(real)
    missing = tmp_path / "gone<b>.png"
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    metrics = [
        step_line("questioner", 1, 1, 0.2, valid_rate=0.5), step_line("questioner", 1, 2, 0.4, valid_rate=1.0),
        {"phase": "curation", "iteration": 1, "n_candidates": 5, "n_kept": 2, "kept_frac": 0.4,
         "confidence_mean": 0.55, "confidence_hist": [1, 0, 0, 0, 0, 2, 0, 0, 0, 2],
         # as grade_candidates computes them from the records below: 3 of 4 valid answerable, 1 of 2 kept right
         "answerable_frac": 0.75, "silver_accuracy": 0.5, "categories": {"counting": 2, "other": 1, "colour": 1}},
        step_line("reasoner", 1, 1, 0.5), step_line("reasoner", 1, 2, 99.0),
        step_line("reasoner", 1, 2, 0.7),  # the run was resumed and logged step 2 again
        {"phase": "summary", "iteration": 1, "silver_accuracy": 0.5, "valid_rate": 0.75, "new_number": 7},
        {"phase": "some_future_phase", "iteration": 1, "x": 1},
        step_line("questioner", 2, 1, None, valid_rate=None),
        step_line("questioner", 2, 2, 0.9),
        {"phase": "curation", "iteration": 2, "n_candidates": 2, "n_kept": 1, "kept_frac": 0.5,
         "confidence_mean": 0.6, "confidence_hist": [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]},
        step_line("reasoner", 2, 1, 0.8),
    ]
    write_jsonl(run_dir / "metrics.jsonl", metrics, tail='{"phase": "reasoner", "iteration": 2, "st')
    write_jsonl(run_dir / "iter_1" / "questions.jsonl", [
        candidate(real, "How many cats?", kept=True, **graded("3.0", "counting")),  # right: 3 = 3.0
        candidate(real, HOSTILE, kept=True, silver=HOSTILE, answers=(HOSTILE, HOSTILE, "x", "y"),
                  **graded("2", "counting")),  # wrong
        candidate(real, None, kept=False, silver=None, confidence=0.0, answers=(), **graded(None, None)),
        candidate(missing, "What colour is the sky?", kept=False, confidence=1.0,
                  **graded(None, "colour")),  # unanswerable: its label counts as wrong
        candidate(tmp_path / "broken.jpg", "Is this a photo?", kept=False, confidence=1.0, **graded("3", "other")),
    ])
    write_jsonl(run_dir / "iter_2" / "questions.jsonl", [
        candidate(missing, "Is it raining?", kept=True, silver="yes"),
        candidate(missing, "Is it day?", kept=False, silver="no", confidence=0.9),
    ])
    (run_dir / "iter_1" / "reasoner").mkdir()  # iteration 1 saved its Reasoner: done
    skipped = f"/data/bad.jpg\tcannot identify image file\n/data/{HOSTILE}.png\ttoo small\n"
    (run_dir / "skipped_images.txt").write_text(skipped)
    return run_dir


def test_full_run_page_is_valid_self_contained_and_complete(run):
    path = report.write_report(run)
    assert path == run / "report.html"
    page = path.read_text(encoding="utf-8")
    checker = check_html(page)
    assert_self_contained(page, checker)
    assert page.count("<svg") == N_CHARTS + 1 and page.count("</svg>") == N_CHARTS + 1  # graded: + silver labels
    assert "Confidence of the candidates, curation of iteration 2" in page  # the last curation's histogram
    assert "demo-run" in page and "tiny" in page
    assert "iterations done: 1" in page  # iteration 2 has no saved Reasoner yet
    assert "Iteration 1" in page and "Iteration 2" in page
    assert "2 input files could not be read" in page and "cannot identify image file" in page
    assert "top_p" in page  # nested config keys are shown


def test_summary_table_numbers(run):
    page = report.write_report(run).read_text(encoding="utf-8")
    rows = check_html(page).tables["summary-table"]
    head, by_iteration = rows[0], {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    assert head[:10] == ["iteration", "questioner reward", "valid in Questioner training", "valid candidates", "kept",
                         "mean confidence", "reasoner reward", "silver-label accuracy", "answerable",
                         "question categories"]
    assert "new_number" in head  # from the summary line
    # the summary's copies of columns before it are not shown twice
    assert "valid_rate" not in head and "silver_accuracy" not in head
    assert set(by_iteration) == {"1", "2"}
    one, two = by_iteration["1"], by_iteration["2"]
    assert one["questioner reward"] == "0.3" and one["reasoner reward"] == "0.6"  # a step logged twice counts once
    assert one["valid candidates"] == "4 / 5" and one["kept"] == "2 / 5 (40%)" and one["mean confidence"] == "0.55"
    assert one["valid in Questioner training"] == "75%" and two["valid in Questioner training"] == "–"
    assert one["new_number"] == "7" and two["new_number"] == "–"
    assert one["silver-label accuracy"] == "50%" and one["answerable"] == "75%"
    assert one["question categories"] == "counting 50%, colour 25%, other 25%"  # most first, then by name
    assert two["silver-label accuracy"] == two["answerable"] == two["question categories"] == "–"  # not graded
    assert two["questioner reward"] == "0.9"  # the null reward is skipped, not counted as 0
    assert two["reasoner reward"] == "0.8"  # the truncated last line is ignored


def test_model_text_is_escaped(run):
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "gone<b>" not in page and "gone&lt;b&gt;.png" in page  # file names are text too
    text = "".join(check_html(page).text)
    assert text.count(HOSTILE) >= 4  # question, silver, answers, responses, raw, config, skipped list


def test_image_embedded_once_and_missing_image_placeholder(run, monkeypatch):
    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)  # data.load_image's, as report reads images
    page = report.write_report(run).read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 1  # cat.png: three questions, one thumbnail
    assert len(opened) == len(set(opened)) == 2, "an image was opened twice"  # the missing one is not opened
    assert page.count("image not found") == 2  # gone<b>.png, once in each iteration's gallery
    assert page.count("image unreadable") == 1  # broken.jpg exists but is no image
    [(css, uri)] = thumbnail_rules(page).items()
    assert uses_of(page, css) == 1  # one card in the gallery of iteration 1
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == report.THUMB_SIDE and thumb.size == (160, 64)


def test_gallery_is_capped(run, monkeypatch):
    monkeypatch.setattr(report, "GALLERY_IMAGES", 1)
    page = report.write_report(run).read_text(encoding="utf-8")
    check_html(page)
    assert "2 more images (2 questions) not shown" in page  # iteration 1: cat.png shown, gone<b>.png and broken.jpg not
    assert "What colour is the sky?" not in page


def test_partial_run_with_only_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "tiny"}))
    page = report.write_report(tmp_path).read_text(encoding="utf-8")
    assert_self_contained(page, check_html(page))
    assert "No metrics logged yet." in page and "No iterations yet." in page
    assert "<svg" not in page and page.count("no data yet") == N_CHARTS
    assert "tiny" in page


def test_partial_run_mid_iteration(tmp_path):
    """Questioner of iteration 1 running: one metric line, an iter folder without questions."""
    write_jsonl(tmp_path / "metrics.jsonl", [step_line("questioner", 1, 1, 0.25)], tail="{")
    (tmp_path / "iter_1").mkdir()
    page = report.write_report(tmp_path).read_text(encoding="utf-8")
    check_html(page)
    assert "Last logged: iteration 1, questioner step 1" in page
    assert "No questions yet." in page and "Iteration 1" in page
    assert page.count("<svg") == 3  # the three per-step charts; no curation yet
    assert "No config.json." in page


def test_write_is_atomic(run, monkeypatch):
    (run / "report.html").write_text("old report")
    before = set(os.listdir(run))
    report.write_report(run)
    assert set(os.listdir(run)) == before  # replaced in place, no temp file left behind
    assert (run / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

    (run / "report.html").write_text("old report")

    def failing_replace(src, dst):
        assert Path(src).parent == run and Path(src).is_file()  # the new page sits beside the old one
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(run)
    assert (run / "report.html").read_text() == "old report"  # a failed write never clobbers the page
    assert set(os.listdir(run)) == before


def test_cli_prints_path(run):
    done = subprocess.run([sys.executable, report.__file__, str(run)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == run / "report.html" and (run / "report.html").is_file()


def test_missing_run_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(tmp_path / "nope")


@pytest.mark.parametrize("name, message", [
    ("nope", "run folder '{}' does not exist; pass a run folder, e.g. runs/<name>"),
    ("metrics.jsonl", "'{}' is a file, not a run folder: pass the folder that holds config.json"),
])
def test_cli_refuses_what_is_not_a_run_folder_in_one_line(name, message, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert report.main([str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("report.py: error: " + message.format(tmp_path / name))
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]  # nothing left behind


def test_a_finished_run_says_so(run):
    assert "Finished" not in report.write_report(run).read_text(encoding="utf-8")
    iterations = json.loads((run / "config.json").read_text())["iterations"]
    (run / "state.json").write_text(json.dumps({"iteration": iterations + 1, "phase": "questioner", "step": 0}))
    page = report.write_report(run).read_text(encoding="utf-8")
    assert re.search(r'<p class="status">Finished: 2 iterations \(\d+ metric lines, last written [^)]+\)\.</p>', page)
    assert "Last logged" not in page


def test_a_16_bit_image_is_shown_as_the_model_sees_it(tmp_path):
    """A 16-bit scan whose values stay under 4096: clipped to 8 bits it is nearly all white, while
    data.load_image stretches its range, as the run did."""
    ramp = np.tile(np.linspace(0, 4000, 200).astype(np.uint16), (100, 1))
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16") or Image.open(path).mode == "I"
    uri = report.encode_thumbnail(path)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"), dtype=float)
    seen = np.asarray(data.load_image(path).resize(thumb.shape[::-1]).convert("L"), dtype=float)
    assert abs(thumb.mean() - seen.mean()) < 3 and abs(thumb.mean() - 127.5) < 5
    assert thumb[:, :10].mean() < 20 and thumb[:, -10:].mean() > 235  # dark to light, as the ramp goes


def test_control_characters_in_model_text_do_not_reach_the_page(run):
    text = "NUL\x00 ESC\x1b[31m red\x7f C1\x85 lone\ud800 tab\tline\nend"
    write_jsonl(run / "iter_2" / "questions.jsonl", [candidate(run / "none.png", text, kept=True, silver=text)])
    page = report.write_report(run).read_text(encoding="utf-8")  # a lone surrogate cannot even be encoded
    check_html(page)
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", page)
    assert "NUL\u2400 ESC\u241b[31m red\ufffd C1\ufffd lone\ufffd tab\tline\nend" in page  # \t and \n kept


def test_step_axes_have_whole_numbers_only(tmp_path):
    write_jsonl(tmp_path / "metrics.jsonl", [step_line("questioner", 1, step, 0.1 * step) for step in (1, 2, 3)])
    page = report.write_report(tmp_path).read_text(encoding="utf-8")
    x_labels = re.findall(r'<text x="[\d.]+" y="[\d.]+" text-anchor="middle">([^<]+)</text>', page)
    assert x_labels and all(float(label).is_integer() for label in x_labels), x_labels
    assert {"1", "2", "3"} <= set(x_labels)


def test_nice_ticks():
    assert report.nice_ticks(0.03, 0.83) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert report.nice_ticks(1, 2, integer=True) == [1, 2]
    assert report.nice_ticks(5, 5) == [4.4, 4.6, 4.8, 5.0, 5.2, 5.4, 5.6]  # one value: drawn mid-axis
    assert report.nice_ticks(0.3, 0.1 + 0.2) == [-0.2, 0.0, 0.2, 0.4, 0.6, 0.8]  # float noise: one value
    assert report.nice_ticks(0, 3e-11) == [0.0, 1e-11, 2e-11, 3e-11]  # a tiny KL
    for lo, hi in [(0.3, 0.1 + 0.2), (0, 3e-11), (-1e308, 1e308), (1e-300, 2e-300)]:
        ticks = report.nice_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi and all(a < b for a, b in zip(ticks, ticks[1:])), (lo, hi)


def test_histogram_shades_the_kept_band_of_the_config(run):
    page = report.write_report(run).read_text(encoding="utf-8")
    assert page.count('class="band"') == 1 and "kept: 0.25 ≤ c ≤ 0.75" in page
    config = json.loads((run / "config.json").read_text())
    del config["tau_low"]
    (run / "config.json").write_text(json.dumps(config))
    assert 'class="band"' not in report.write_report(run).read_text(encoding="utf-8")


def numbers(text):
    return [float(v) for v in text.replace(",", " ").split()]


def test_line_chart_draws_each_value_where_its_axis_says():
    """Read back from the SVG: every point is on the same decreasing line through the y ticks'
    labels and positions, inside the plot, and the ticks cover the data."""
    values = [(1, 0.42), (2, 0.1), (3, 0.77), (5, 0.3)]
    page = report.line_chart("reward", {"questioner": values}, "step", "reward")
    points = numbers(re.search(r'<polyline points="([^"]+)"', page).group(1))
    xs, ys = points[0::2], points[1::2]
    ticks = [(float(label), float(y)) for y, label in re.findall(r'<text x="[\d.]+" y="([\d.]+)" '
                                                                 r'text-anchor="end">([^<]+)</text>', page)]
    (v0, p0), (v1, p1) = ticks[0], ticks[-1]
    assert v0 <= min(y for _, y in values) and v1 >= max(y for _, y in values)
    slope = (p1 - p0) / (v1 - v0)
    assert slope < 0  # larger values higher up
    for (_, value), pixel_y in zip(values, ys):
        line_y = p0 - 4 + slope * (value - v0)  # tick labels sit 4 px below their grid line
        assert abs(pixel_y - line_y) <= 0.2
    assert xs == sorted(xs) and report.MARGIN_LEFT <= xs[0] and xs[-1] <= report.CHART_W - report.MARGIN_RIGHT
    assert (xs[3] - xs[2]) == pytest.approx(2 * (xs[2] - xs[1]), abs=0.2)  # x 3 -> 5 is twice 2 -> 3


def test_histogram_band_covers_exactly_the_kept_bins():
    page = report.histogram_chart("confidence", [1, 2, 3, 4], band=(0.25, 0.75))
    band = numbers(" ".join(re.search(r'<rect class="band" x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', page).groups()))
    bars = [numbers(" ".join(m)) for m in re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"[^>]*fill="#6366f1"',
                                                     page)]
    assert len(bars) == 4
    # bars are inset 2 px into their bins: bins 2 and 3 (c in [0.25, 0.75]) are the band
    assert band[0] == pytest.approx(bars[1][0] - 2, abs=0.15)
    assert band[0] + band[1] == pytest.approx(bars[2][0] + bars[2][1] + 2, abs=0.15)

# -----------------------------------------------------------------------------
# training episodes (iter_<k>/{questioner,reasoner}_episodes.jsonl) and graded curation

LONG = "x" * 1000 + " so the answer is \\boxed{END}"


def q_episode(step, image, i, question="What is it?", **extra):
    """A Questioner episode with reward (i % 4) / 4 + step / 100."""
    return {"step": step, "image": str(image), "raw": f"<question>{question}</question>", "question": question,
            "valid": question is not None, "answers": ["3", "3", "4", None], "silver": "3", "confidence": 0.5,
            "uncertainty": 1.0, "diversity": 0.0, "reward": (i % 4) / 4 + step / 100, **extra}


def r_episode(step, image, question, rewards, responses=None):
    responses = responses or [f"so the answer is \\boxed{{{r}}}" for r in rewards]
    return {"step": step, "image": str(image), "question": question, "silver": "1",
            "answers": [{"response": t, "answer": str(r), "reward": r, "length": 10 + j}
                        for j, (t, r) in enumerate(zip(responses, rewards))]}


def q_rewards(step, n):
    return [(i % 4) / 4 + step / 100 for i in range(n)]


@pytest.fixture
def episodes(run):
    """The run with episode logs: iteration 1 has 8 Questioner steps (step 1 with 30 questions, more
    than a step shows), 2 Reasoner steps; iteration 2 has 2 Questioner steps and no Reasoner step yet.
    Images: cat.png (also in curation), dog.png (only here), gone<b>.png (missing)."""
    tmp = run.parent
    cat, dog, missing = tmp / "cat.png", tmp / "dog.png", tmp / "gone<b>.png"
    Image.new("RGB", (64, 64), (30, 200, 30)).save(dog)
    rows = []
    for step in range(1, 9):
        n = 30 if step == 1 else 4
        images = [cat, cat, dog, dog] + [dog] * (n - 4)
        rows += [q_episode(step, images[i], i) for i in range(n)]
    rows[1] = q_episode(1, cat, 1, question=None, raw=HOSTILE + " no tags")  # invalid: its raw output shown
    rows[2]["question"] = HOSTILE
    write_jsonl(run / "iter_1" / "questioner_episodes.jsonl", rows)
    write_jsonl(run / "iter_1" / "reasoner_episodes.jsonl", [
        r_episode(1, cat, "How many cats?", [1.0, 0.0], responses=[LONG, HOSTILE]),
        r_episode(1, missing, "Is it raining?", [0.0, 0.0]),
        r_episode(2, dog, "How many dogs?", [1.0, 1.0]),
    ])
    write_jsonl(run / "iter_2" / "questioner_episodes.jsonl",
                [q_episode(step, missing, i) for step in (1, 2) for i in range(4)], tail='{"step": 3, "ima')
    return run


def step_blocks(page):
    """{(iteration, role, step): (summary, html of the block)} of every per-step <details>."""
    blocks = re.findall(r'<details class="step" id="episodes-(\d+)-(\w+)-step-(\d+)"><summary>([^<]*)</summary>'
                        r'(.*?)\n</details>\n(?=<details class="step"|<p|<h|$)', page, re.S)
    return {(int(k), role, int(step)): (summary, body) for k, role, step, summary, body in blocks}


def test_episode_steps_with_their_counts_and_mean_rewards(episodes):
    page = report.write_report(episodes).read_text(encoding="utf-8")
    check_html(page)
    blocks = step_blocks(page)
    assert sorted(blocks) == ([(1, "questioner", s) for s in (1, 2, 3, 6, 7, 8)]
                              + [(1, "reasoner", 1), (1, "reasoner", 2), (2, "questioner", 1), (2, "questioner", 2)])
    # (8·0 + 8·.25 + 7·.5 + 7·.75) / 30 + .01
    assert blocks[1, "questioner", 1][0] == "step 1: mean reward 0.368, 30 questions"
    assert blocks[1, "questioner", 2][0] == "step 2: mean reward 0.395, 4 questions"
    for s in (3, 6, 7, 8):
        rewards = q_rewards(s, 4)
        assert blocks[1, "questioner", s][0] == f"step {s}: mean reward {report.fmt(sum(rewards) / 4)}, 4 questions"
    assert blocks[1, "reasoner", 1][0] == "step 1: mean reward 0.25, 2 questions"  # over the 4 answers
    assert blocks[1, "reasoner", 2][0] == "step 2: mean reward 1, 1 question"
    assert blocks[2, "questioner", 2][0] == "step 2: mean reward 0.395, 4 questions"  # the truncated line is skipped
    # rows: one per question; a Questioner's questions about one image share its thumbnail
    body = blocks[1, "questioner", 2][1]
    assert body.count("<tr>") == 1 + 4 and body.count('rowspan="2"') == 2
    assert blocks[1, "reasoner", 1][1].count("<tr>") == 1 + 2
    assert "No Reasoner steps logged." in page  # iteration 2
    assert "8 steps, 58 questions." in page and "2 steps, 3 questions." in page  # iteration 1: 30 + 7·4; 2 + 1


def test_episode_steps_and_rows_are_capped(episodes, monkeypatch):
    page = report.write_report(episodes).read_text(encoding="utf-8")
    body = step_blocks(page)[1, "questioner", 1][1]
    assert body.count("<tr>") == 1 + report.EPISODE_ROWS == 25
    assert "6 more questions of this step not shown; all are in iter_1/questioner_episodes.jsonl." in body
    assert "2 steps not shown (steps 4–5); all are in iter_1/questioner_episodes.jsonl." in page
    assert "more questions" not in step_blocks(page)[1, "questioner", 2][1]
    assert "not shown (step" not in page.split('id="episodes-2"')[1]  # iteration 2: 2 steps, all shown

    monkeypatch.setattr(report, "EPISODE_STEPS_FIRST", 1)
    monkeypatch.setattr(report, "EPISODE_STEPS_LAST", 0)
    page = report.write_report(episodes).read_text(encoding="utf-8")
    check_html(page)
    assert [key for key in step_blocks(page) if key[:2] == (1, "questioner")] == [(1, "questioner", 1)]
    assert "7 steps not shown (steps 2–8)" in page and "1 step not shown (step 2)" in page  # iteration 2


def test_episode_text_is_escaped_and_long_responses_clipped(episodes):
    page = report.write_report(episodes).read_text(encoding="utf-8")
    checker = check_html(page)
    assert_self_contained(page, checker)
    assert "<script" not in page and "alert(1)</script>" not in page
    blocks = step_blocks(page)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;"
    q1, r1 = blocks[1, "questioner", 1][1], blocks[1, "reasoner", 1][1]
    assert f'<span class="badge invalid">invalid</span> <span class="text">{escaped} no tags</span>' in q1
    assert f'<span class="question">{escaped}</span>' in q1  # a valid hostile question
    assert f'<span class="text">{escaped}</span>' in r1  # a hostile response
    # a long response: its first PREVIEW_CHARS characters, the whole of it one click away
    assert f'<span class="text">{"x" * report.PREVIEW_CHARS}…</span>' in r1
    assert f"<summary>all {len(LONG):,} characters</summary><pre>{LONG}</pre>" in r1
    assert r1.count("END") == 1
    assert "answer <b>1.0</b> · reward 1 · 10 tokens" in r1 and "answer <b>0.0</b> · reward 0 · 11 tokens" in r1


def test_episode_images_embedded_once(episodes, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    page = report.write_report(episodes).read_text(encoding="utf-8")
    rules = thumbnail_rules(page)
    assert len(rules) == 2  # cat.png and dog.png, each written once however often shown
    assert len(opened) == len(set(opened)) == 3, "an image was read twice"  # cat, dog and broken.jpg
    cat, dog = sorted(rules, key=lambda css: -uses_of(page, css))
    # cat: its curation card, steps 1, 2, 3, 6, 7, 8 (two questions each, one thumbnail) and Reasoner step 1
    assert uses_of(page, cat) == 1 + 6 + 1
    assert uses_of(page, dog) == 6 + 1  # one run of rows per Questioner step, Reasoner step 2
    # missing image: 2 curation cards, Reasoner step 1, iteration 2's two steps
    assert page.count("image not found") == 2 + 1 + 2


def test_curation_gallery_shows_true_answers_and_wrong_labels(run):
    page = report.write_report(run).read_text(encoding="utf-8")
    check_html(page)
    gallery_1 = page.split('<h3 id="iter-1">')[1].split('<h3 id="iter-2">')[0]
    assert "silver: <b>3</b> · true answer: <b>3.0</b> · confidence" in gallery_1  # right: no mark
    assert gallery_1.count("wrong silver label") == 2  # the hostile label, the unanswerable question
    assert "true answer: <i>none (the scene does not settle it)</i>" in gallery_1
    assert gallery_1.count("true answer") == 4  # the invalid candidate has none
    assert "true answer" not in page.split('<h3 id="iter-2">')[1]  # iteration 2 was not graded


def test_silver_accuracy_chart_and_summary_fallback(run):
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "Silver labels against the scenes&#x27; truth" in page
    metrics = [line for line in report.read_jsonl(run / "metrics.jsonl")
               if line.get("phase") != "summary" and not (line.get("phase") == "curation" and line["iteration"] == 1)]
    write_jsonl(run / "metrics.jsonl", metrics)
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "Silver labels against" not in page and page.count("<svg") == N_CHARTS  # ungraded: no such chart
    assert report.silver_accuracy(1, {}, {1: {"silver_accuracy": 0.72}}) == 0.72  # from the summary line
    assert report.silver_accuracy(1, {1: {"silver_accuracy": 0.6}}, {1: {"silver_accuracy": 0.72}}) == 0.6
    assert report.category_breakdown({"a": 1, "b": 0, "c": None}) == "a 100%" and report.category_breakdown({}) == "–"


def test_an_image_named_as_a_script_is_shown_as_text(run):
    """A file name is text the user did not write either: one that opens a <script> tag (a name holds
    no "/"), of an image that exists (shown in the gallery) and of one that does not."""
    named = run.parent / "<script>alert(2).png"
    Image.new("RGB", (64, 64), (0, 0, 200)).save(named)
    gone = run.parent / "<script>alert(3).png"
    write_jsonl(run / "iter_2" / "questions.jsonl", [candidate(named, "What is it?", kept=True),
                                                     candidate(gone, "And this?", kept=True)])
    page = report.write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(3).png" in page
    check_html(page)
