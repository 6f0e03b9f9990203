"""
The run report: one self-contained HTML page per run folder, runs/<name>/report.html.

The page shows, top to bottom:
- a header: run name, model, iterations done, and the last thing the run logged (or that it finished);
- a summary table, one row per iteration: mean Questioner reward, the share of valid questions
  the Questioner wrote while training, valid candidate questions, questions kept by curation, mean
  majority-vote confidence, mean Reasoner reward, and for shapes-world runs (whose curation is graded
  against each scene's truth) the silver labels' accuracy, the share of answerable questions and the
  categories the Questioner wrote (plus any numbers the loop wrote in "summary" lines);
- curves as inline SVG: reward, KL and completion length of both roles against their training
  step, the kept fraction and mean confidence per iteration, the confidence histogram of the
  last curation, and (graded runs) the silver labels' accuracy per iteration;
- a gallery per iteration: each image once as a thumbnail with the questions written about it,
  their silver answer (and true answer, when graded), confidence and a kept/dropped badge; the
  Reasoner's m sampled answers and full responses open with a click;
- the training episodes: per iteration and role, one collapsed block per step (its first and last
  steps) with the step's questions, the Reasoner's answers and the rewards;
- the images the run skipped as unreadable, and the run's config.

It reads only the run folder, so it runs on a copy of one anywhere; of the project it uses only
data.py, to show each image as the model saw it, and rewards.py's answer equivalence, to mark a
silver label that is not the true answer as curation's grading counted it. The training loop
rewrites it after every phase, so every input may be missing or half written (a killed run leaves a
truncated last metrics line); the page is written to a temp file and moved into place, so a reader
never sees half a page.

Left out: JavaScript (the only interaction is <details>), external files of any kind (images are
base64 JPEG thumbnails, each written once in the page's style and shown by class wherever the image
appears; styles are inline), per-token views, and comparisons between runs.

    python tools/report.py runs/<name>      # writes runs/<name>/report.html and prints its path
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as `python tools/report.py`: the modules it imports are in the repo root
    sys.path[0] = str(REPO)

import argparse
import base64
import html
import io
import json
import math
import os
import re
import time
from collections import Counter

from data import load_image
from rewards import answers_equivalent

THUMB_SIDE = 160  # px, longest side of a gallery thumbnail
THUMB_QUALITY = 80  # JPEG quality: small enough that a gallery of 24 images stays well under 1 MB
GALLERY_IMAGES = 24  # images shown per iteration; the rest are counted, not shown
# The episode logs grow by a batch every training step (20 steps x 2 roles per iteration by default,
# each Reasoner row with G whole responses): shown whole, they would make the page tens of MB. The
# first steps show where a role started and the last where it ended; the logs keep everything.
EPISODE_STEPS_FIRST, EPISODE_STEPS_LAST = 3, 3  # steps shown per iteration and role
EPISODE_ROWS = 24  # questions shown per step
PREVIEW_CHARS = 240  # characters of a response or raw output shown in a table cell; the rest a click away
TRAINING_PHASES = ("questioner", "reasoner")
COLORS = {"questioner": "#2563eb", "reasoner": "#dc2626", "kept fraction": "#059669", "mean confidence": "#d97706",
          "silver accuracy": "#7c3aed", "answerable share": "#0891b2"}

# -----------------------------------------------------------------------------
# reading the run folder (every file optional, every field optional)

def read_json(path) -> dict:
    """A JSON object from path, or {} when the file is missing, half written or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a .jsonl file; lines that don't parse (a run killed mid-write) are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def iteration_folders(run_dir) -> dict[int, Path]:
    """{k: run_dir/iter_<k>} for every iteration folder, whatever is inside it yet."""
    folders = {}
    for path in Path(run_dir).glob("iter_*"):
        suffix = path.name[len("iter_"):]
        if path.is_dir() and suffix.isdigit():
            folders[int(suffix)] = path
    return folders


def number(value):
    """value as a float when it is a finite real number, else None (null, text, NaN, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def mean(values):
    """Mean of the numbers among values, or None when there are none."""
    numbers = [v for v in map(number, values) if v is not None]
    return sum(numbers) / len(numbers) if numbers else None


def training_steps(metrics, phase) -> list[dict]:
    """One role's step lines in training order. A resumed run may log a step twice: the last wins."""
    by_step = {}
    for line in metrics:
        if line.get("phase") == phase and is_int(line.get("iteration")) and is_int(line.get("step")):
            by_step[(line["iteration"], line["step"])] = line
    return [by_step[key] for key in sorted(by_step)]


def lines_by_iteration(metrics, phase) -> dict[int, dict]:
    """{iteration: line} for once-per-iteration lines (curation, summary); the last line wins."""
    return {line["iteration"]: line for line in metrics
            if line.get("phase") == phase and is_int(line.get("iteration"))}

# -----------------------------------------------------------------------------
# formatting

# Characters that may not stand in an HTML page: C0 controls but tab, newline and carriage return
# (NUL, ESC of terminal colours), DEL and C1, which HTML forbids; and lone surrogates (a "\ud800"
# escape in a JSON line, a file name that is not UTF-8), which UTF-8 cannot encode at all.
UNSAFE_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def visible(match) -> str:
    """A C0 control as its Unicode picture (NUL -> ␀, ESC -> ␛), so it still shows; the rest as �."""
    code = ord(match.group())
    return chr(0x2400 + code) if code < 0x20 else "\ufffd"


def esc(text) -> str:
    """Any text for HTML, quotes included. Questions and answers are arbitrary model output."""
    return html.escape(UNSAFE_CHARS.sub(visible, str(text)), quote=True)


def fmt(value) -> str:
    """A number for a table cell: 3 significant digits, thousands without exponent, '–' for none."""
    x = number(value)
    if x is None:
        return "–" if value is None else esc(value)
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def plural(n, word) -> str:
    """plural(1, 'image') -> '1 image', plural(3, 'image') -> '3 images'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def percent(value) -> str:
    x = number(value)
    return "–" if x is None else f"{100 * x:.0f}%"

# -----------------------------------------------------------------------------
# SVG charts

CHART_W, CHART_H = 540, 270
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 60, 20, 36, 46


def nice_ticks(lo, hi, count=5, integer=False) -> list[float]:
    """
    About count round numbers (1, 2 or 5 times a power of ten apart) that cover [lo, hi].
    Example: nice_ticks(0.03, 0.83) -> [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]. With integer, the spacing
    is a whole number (iterations and steps have no halves).
    """
    # One value, or values apart by float noise (0.3 and 0.30000000000000004), which ticks could
    # not tell apart: give it some room so it is drawn mid-axis.
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi / 2 - lo / 2) / (count / 2)  # = (hi - lo) / count, exactly, without overflow near ±1e308
    magnitude = 10 ** math.floor(math.log10(raw))
    spacing = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integer:
        spacing = max(1, round(spacing))
    first, last = math.floor(lo / spacing + 1e-9), math.ceil(hi / spacing - 1e-9)
    # 12 significant digits: 0.6 rather than 0.6000000000000001, and still exact for tiny spacings
    return [float(f"{i * spacing:.12g}") for i in range(first, last + 1)]


def tick_label(x) -> str:
    return f"{x:g}" if abs(x) < 1e5 else f"{x:.2g}"


def plot_area(x_ticks, y_ticks):
    """Functions mapping data x and y to SVG pixels inside the margins."""
    width = CHART_W - MARGIN_LEFT - MARGIN_RIGHT
    height = CHART_H - MARGIN_TOP - MARGIN_BOTTOM
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    px = lambda x: MARGIN_LEFT + (x - x0) / (x1 - x0) * width
    py = lambda y: CHART_H - MARGIN_BOTTOM - (y - y0) / (y1 - y0) * height
    return px, py


def axes(x_ticks, y_ticks, px, py, x_label, y_label) -> list[str]:
    """Grid lines, both axes with tick labels, and the axis titles, as SVG elements."""
    bottom, left, right = CHART_H - MARGIN_BOTTOM, MARGIN_LEFT, CHART_W - MARGIN_RIGHT
    parts = []
    for y in y_ticks:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{right}" y2="{py(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{tick_label(y)}</text>')
    for x in x_ticks:
        parts.append(f'<line x1="{px(x):.1f}" y1="{bottom}" x2="{px(x):.1f}" y2="{bottom + 4}" class="axis"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{bottom + 17}" text-anchor="middle">{tick_label(x)}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    parts.append(f'<line x1="{left}" y1="{MARGIN_TOP}" x2="{left}" y2="{bottom}" class="axis"/>')
    parts.append(f'<text x="{(left + right) / 2:.0f}" y="{CHART_H - 8}" text-anchor="middle" '
                 f'class="label">{esc(x_label)}</text>')
    mid_y = (MARGIN_TOP + bottom) / 2
    parts.append(f'<text x="14" y="{mid_y:.0f}" text-anchor="middle" transform="rotate(-90 14 {mid_y:.0f})" '
                 f'class="label">{esc(y_label)}</text>')
    return parts


def legend(names) -> list[str]:
    """A colour swatch and name per series, in a row above the plot."""
    parts, x = [], MARGIN_LEFT
    for name in names:
        parts.append(f'<rect x="{x}" y="10" width="12" height="12" fill="{COLORS[name]}"/>')
        parts.append(f'<text x="{x + 17}" y="20">{esc(name)}</text>')
        x += 28 + 7 * len(name)  # about 7 px per character at 12 px
    return parts


def svg(parts, title) -> str:
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {CHART_H}" '
            f'width="{CHART_W}" height="{CHART_H}" role="img"><title>{esc(title)}</title>\n{body}\n</svg>')


def line_chart(title, series, x_label, y_label, integer_x=False, y_include=()) -> str:
    """
    A figure with one line per series, or a 'no data yet' note when no series has a point.
    series: {name: [(x, y), ...]} with y None where a line lacked the value (the point is skipped).
    y_include: values the y axis must reach anyway, e.g. (0, 1) for fractions.
    """
    series = {name: [(x, y) for x, y in points if number(y) is not None] for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return figure(title, '<p class="empty">no data yet</p>')
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points] + list(y_include)
    x_ticks = nice_ticks(min(xs), max(xs), count=6, integer=integer_x)
    y_ticks = nice_ticks(min(ys), max(ys))
    px, py = plot_area(x_ticks, y_ticks)
    parts = axes(x_ticks, y_ticks, px, py, x_label, y_label) + legend(series)
    for name, points in series.items():
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{COLORS[name]}" stroke-width="1.8"/>')
        if len(points) <= 40:  # markers help on short series and only add clutter on long ones
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{COLORS[name]}"/>' for x, y in points]
    return figure(title, svg(parts, title))


def histogram_chart(title, counts, band=None) -> str:
    """A bar chart of counts over equal bins of [0, 1], with bin edges on the x axis; `band`
    (low, high) shades the confidence band that curation keeps."""
    counts = [number(c) or 0 for c in counts]
    n = len(counts)
    x_ticks = [i / n for i in range(n + 1)]
    y_ticks = nice_ticks(0, max(counts + [1]), integer=True)
    px, py = plot_area(x_ticks, y_ticks)
    parts = axes(x_ticks, y_ticks, px, py, "majority-vote confidence c", "candidate questions")
    if band is not None:
        low, high = band
        parts.append(f'<rect class="band" x="{px(low):.1f}" y="{py(y_ticks[-1]):.1f}" width="{px(high) - px(low):.1f}" '
                     f'height="{py(0) - py(y_ticks[-1]):.1f}" fill="#22c55e" fill-opacity="0.15"/>')
        parts.append(f'<text x="{(px(low) + px(high)) / 2:.1f}" y="{py(y_ticks[-1]) + 12:.1f}" '
                     f'text-anchor="middle">kept: {fmt(low)} ≤ c ≤ {fmt(high)}</text>')
    for i, count in enumerate(counts):
        left, right = px(i / n) + 2, px((i + 1) / n) - 2
        parts.append(f'<rect x="{left:.1f}" y="{py(count):.1f}" width="{right - left:.1f}" '
                     f'height="{py(0) - py(count):.1f}" fill="#6366f1"/>')
        parts.append(f'<text x="{(left + right) / 2:.1f}" y="{py(count) - 4:.1f}" '
                     f'text-anchor="middle">{fmt(count)}</text>')
    return figure(title, svg(parts, title))


def figure(title, body) -> str:
    return f'<figure><figcaption>{esc(title)}</figcaption>\n{body}\n</figure>'

# -----------------------------------------------------------------------------
# sections

def header(run_dir, config, state, metrics, folders, summaries) -> str:
    """Run name, model, iterations done, and one line on where the run stands."""
    models = [f"{esc(key)}: {esc(value)}" for key, value in flatten(config).items()
              if "model" in key.lower() and isinstance(value, str)]
    # iter_<k>/reasoner/ is saved at the very end of an iteration, so its presence means k is done
    done = sorted({k for k, folder in folders.items() if (folder / "reasoner").is_dir()} | set(summaries))
    known = [line for line in metrics if line.get("phase") in TRAINING_PHASES + ("curation",)]
    logged = ""
    if metrics:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(Path(run_dir, "metrics.jsonl").stat().st_mtime))
        logged = f" ({len(metrics)} metric lines, last written {updated})"
    # state.json's iteration is the one in progress: past the last, the run has finished
    iteration, iterations = state.get("iteration"), config.get("iterations")
    if is_int(iteration) and is_int(iterations) and iteration > iterations:
        status = f"Finished: {plural(config['iterations'], 'iteration')}{logged}."
    elif known:
        last = known[-1]
        where = f"iteration {fmt(last.get('iteration'))}, {esc(last['phase'])}"
        if last["phase"] != "curation":
            where += f" step {fmt(last.get('step'))}"
        status = f"Last logged: {where}{logged}."
    else:
        status = "No metrics logged yet."
    return (f'<h1>{esc(Path(run_dir).resolve().name)}</h1>\n'
            f'<p class="meta">{" · ".join(models) or "model: not in config"} · '
            f'iterations done: {len(done)}{" (" + ", ".join(map(str, done)) + ")" if done else ""}</p>\n'
            f'<p class="status">{status}</p>\n'
            f'<p class="meta">Report written {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>')


# Fields of selfplay.py's summary lines that the fixed columns of the table already show.
SHOWN_IN_SUMMARY = {"questioner_reward", "valid_rate", "n_kept", "kept_frac", "confidence_mean", "reasoner_reward",
                    "silver_accuracy"}


def silver_accuracy(k, curation, summaries):
    """Iteration k's share of kept questions whose silver label is the true answer: the curation
    line's, else the summary's copy; None for runs whose images have no known scene."""
    value = number(curation.get(k, {}).get("silver_accuracy"))
    return value if value is not None else number(summaries.get(k, {}).get("silver_accuracy"))


def category_breakdown(categories) -> str:
    """{'counting': 8, 'colour': 7, 'other': 5} -> 'counting 40%, colour 35%, other 25%', most first."""
    if not isinstance(categories, dict):
        return "–"
    counts = {name: count for name, count in categories.items() if number(count) is not None and count > 0}
    total = sum(counts.values())
    if not total:
        return "–"
    ranked = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))
    return ", ".join(f"{esc(name)} {100 * count / total:.0f}%" for name, count in ranked)


def summary_table(iterations, metrics, questions, summaries) -> str:
    """One row per iteration; extra columns for whatever the loop's summary lines hold."""
    if not iterations:
        return '<h2 id="summary">Summary</h2>\n<p class="empty">No iterations yet.</p>'
    steps = {phase: training_steps(metrics, phase) for phase in TRAINING_PHASES}
    curation = lines_by_iteration(metrics, "curation")
    extra = list(dict.fromkeys(key for line in summaries.values() for key in line
                               if key not in ("phase", "iteration") and key not in SHOWN_IN_SUMMARY))
    # Two validity numbers, of two sets of questions: those the Questioner wrote in its GRPO steps
    # (valid_rate of its step lines), and the candidates it then wrote for curation.
    # Silver-label accuracy, answerable share and categories: curation's grades against the scenes
    # of a shapes-world run (data.grade_candidates), "–" for images without a known truth.
    head = ["iteration", "questioner reward", "valid in Questioner training", "valid candidates", "kept",
            "mean confidence", "reasoner reward", "silver-label accuracy", "answerable", "question categories"] + extra
    rows = []
    for k in iterations:
        reward = {phase: mean(line.get("reward_mean") for line in steps[phase] if line["iteration"] == k)
                  for phase in TRAINING_PHASES}
        valid_rate = mean(line.get("valid_rate") for line in steps["questioner"] if line["iteration"] == k)
        candidates = questions.get(k, [])
        valid = f"{sum(bool(q.get('valid')) for q in candidates)} / {len(candidates)}" if candidates else "–"
        cur = curation.get(k, {})
        kept = "–"
        if cur:
            kept = f"{fmt(cur.get('n_kept'))} / {fmt(cur.get('n_candidates'))} ({percent(cur.get('kept_frac'))})"
        cells = [str(k), fmt(reward["questioner"]), percent(valid_rate), valid, kept, fmt(cur.get("confidence_mean")),
                 fmt(reward["reasoner"]), percent(silver_accuracy(k, curation, summaries)),
                 percent(cur.get("answerable_frac")), category_breakdown(cur.get("categories"))]
        cells += [fmt(summaries.get(k, {}).get(key)) for key in extra]
        classes = {len(head) - len(extra) - 1: ' class="categories"'}  # the one cell that may wrap
        rows.append("<tr>" + "".join(f"<td{classes.get(i, '')}>{cell}</td>" for i, cell in enumerate(cells)) + "</tr>")
    return ('<h2 id="summary">Summary</h2>\n<table id="summary-table">\n<tr>'
            + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>\n" + "\n".join(rows) + "\n</table>")


def charts(metrics, config) -> str:
    """Reward, KL and completion length per role; curation numbers per iteration; the last histogram
    with the run's confidence band (config's tau_low, tau_high) shaded."""
    steps = {phase: training_steps(metrics, phase) for phase in TRAINING_PHASES}

    def per_step(field):
        # x counts a role's steps across iterations, so each role's curve is one unbroken line
        return {phase: [(i + 1, line.get(field)) for i, line in enumerate(lines)] for phase, lines in steps.items()}

    x_label = "training step of that role (counted across iterations)"
    curation = lines_by_iteration(metrics, "curation")
    per_iteration = {"kept fraction": [(k, line.get("kept_frac")) for k, line in sorted(curation.items())],
                     "mean confidence": [(k, line.get("confidence_mean")) for k, line in sorted(curation.items())]}
    # Graded runs only (shapes-world scenes): the paper's diagnostic, its silver labels 72 -> 65 -> 61%
    # right over three iterations as the Questioner's questions grow harder.
    summaries = lines_by_iteration(metrics, "summary")
    graded = {"silver accuracy": [(k, silver_accuracy(k, curation, summaries))
                                  for k in sorted(set(curation) | set(summaries))],
              "answerable share": [(k, line.get("answerable_frac")) for k, line in sorted(curation.items())]}
    grades = ""
    if any(number(y) is not None for points in graded.values() for _, y in points):
        grades = line_chart("Silver labels against the scenes' truth", graded, "iteration", "fraction",
                            integer_x=True, y_include=(0, 1))
    with_hist = [k for k, line in sorted(curation.items())
                 if isinstance(line.get("confidence_hist"), list) and line["confidence_hist"]]
    if with_hist:
        band = (number(config.get("tau_low")), number(config.get("tau_high")))
        hist = histogram_chart(f"Confidence of the candidates, curation of iteration {with_hist[-1]}",
                               curation[with_hist[-1]]["confidence_hist"], band if None not in band else None)
    else:
        hist = figure("Confidence of the candidates, last curation", '<p class="empty">no data yet</p>')
    return "\n".join([
        '<h2 id="curves">Curves</h2>\n<div class="charts">',
        line_chart("Reward (mean over the batch)", per_step("reward_mean"), x_label, "reward mean", integer_x=True),
        line_chart("KL to the reference policy", per_step("kl"), x_label, "KL", integer_x=True),
        line_chart("Completion length", per_step("completion_len"), x_label, "tokens", integer_x=True),
        line_chart("Curation per iteration", per_iteration, "iteration", "fraction", integer_x=True, y_include=(0, 1)),
        hist,
        grades,
        "</div>",
    ])

# -----------------------------------------------------------------------------
# gallery

class Thumbnails:
    """
    The page's images, each read and encoded once and its data URI written once, as a CSS rule
    (.img-<n>) in the page's style that every place showing the image refers to. A run shows the same
    image in curation, in Questioner steps and in Reasoner steps: an <img> with its own data URI in
    each place would repeat some kB of base64 every time.
    """

    def __init__(self):
        self.classes = {}  # path -> CSS class, or None when the image can't be read
        self.uris = []  # the data URI of img-<n>

    def element(self, path, small=False) -> str:
        """The image at path as a thumbnail, or a placeholder saying it is missing or unreadable."""
        path = str(path) if path else ""
        size = " small" if small else ""
        if path and path not in self.classes:
            uri = encode_thumbnail(path)
            self.classes[path] = None if uri is None else f"img-{len(self.uris)}"
            if uri is not None:
                self.uris.append(uri)
        if self.classes.get(path):
            return (f'<div class="thumb{size} {self.classes[path]}" role="img" aria-label="{esc(Path(path).name)}" '
                    f'title="{esc(path)}"></div>')
        problem = "image unreadable" if path and Path(path).exists() else "image not found"
        return f'<div class="thumb{size} missing" title="{esc(path)}">{problem}</div>'

    def style(self) -> str:
        """The CSS rules of every image shown, one per distinct image."""
        return "\n".join(f'.img-{i} {{ background-image: url("{uri}"); }}' for i, uri in enumerate(self.uris))


def encode_thumbnail(path):
    # data.load_image, as the run read it: upright, transparency over white, 16-bit stretched (a
    # plain convert would clip it near white), and a placeholder for what the run could not read.
    try:
        image = load_image(path)
    except Exception:  # any unreadable or odd file becomes a placeholder; the report must not fail
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def answer_tally(answers) -> str:
    """Answers with their counts, most common first: ['3', '3', None] -> '3 ×2 · (none) ×1'."""
    counts = Counter("(none)" if a is None else str(a) for a in answers)
    return " · ".join(f"{esc(answer)} ×{count}" for answer, count in counts.most_common())


def truth(q) -> str:
    """A graded candidate's true answer, for after its silver label, with a badge when the label is
    wrong (as curation's grading counts it: an unanswerable question's label is wrong); "" when the
    candidate was not graded (no known scene) or is no valid question."""
    if "true_answer" not in q or q.get("question") is None or q.get("valid") is False:
        return ""
    true = q.get("true_answer")
    if true is None:
        text = " · true answer: <i>none (the scene does not settle it)</i>"
    else:
        text = f" · true answer: <b>{esc(true)}</b>"
    if true is None or not answers_equivalent(q.get("silver"), true):
        text += ' <span class="badge wrong">wrong silver label</span>'
    return text


def question_item(q) -> str:
    """One candidate: badge, question, silver answer and confidence, then the details behind clicks."""
    answers = q.get("answers") if isinstance(q.get("answers"), list) else []
    responses = q.get("responses") if isinstance(q.get("responses"), list) else []
    if q.get("question") is None or q.get("valid") is False:
        badge, text = '<span class="badge invalid">invalid</span>', '<i>(no valid question in the output)</i>'
    else:
        status = "kept" if q.get("kept") else "dropped"
        badge = f'<span class="badge {status}">{status}</span>'
        text = esc(q["question"])
    silver = "(none)" if q.get("silver") is None else q["silver"]
    parts = [f'<li>{badge} <span class="question">{text}</span>',
             f'<div class="meta">silver: <b>{esc(silver)}</b>{truth(q)} · confidence {fmt(q.get("confidence"))}</div>']
    if responses or answers:
        items = []
        for i in range(max(len(answers), len(responses))):
            answer = answers[i] if i < len(answers) else None
            response = responses[i] if i < len(responses) else ""
            answer = "(none)" if answer is None else answer
            items.append(f'<li>answer: <b>{esc(answer)}</b><pre>{esc(response)}</pre></li>')
        parts.append(f'<details><summary>Reasoner answers: {answer_tally(answers)}</summary>'
                     f'<ol>{"".join(items)}</ol></details>')
    if q.get("raw") is not None:
        parts.append(f'<details><summary>Questioner output</summary><pre>{esc(q["raw"])}</pre></details>')
    parts.append("</li>")
    return "\n".join(parts)


def image_card(path, candidates, thumbs) -> str:
    """One image: its thumbnail (or a placeholder) beside the questions written about it."""
    thumb = thumbs.element(path)
    name = Path(path).name if path else "(no image path)"
    n_kept = sum(bool(q.get("kept")) for q in candidates)
    return (f'<div class="card">\n<div class="side">{thumb}<div class="name">{esc(name)}</div>'
            f'<div class="meta">{n_kept} of {len(candidates)} kept</div></div>\n'
            f'<ul class="questions">\n' + "\n".join(question_item(q) for q in candidates) + "\n</ul>\n</div>")


def gallery(k, candidates, thumbs) -> str:
    """The candidates of iteration k grouped by image, at most GALLERY_IMAGES images."""
    title = f'<h3 id="iter-{k}">Iteration {k}</h3>'
    if not candidates:
        return title + '\n<p class="empty">No questions yet.</p>'
    by_image = {}
    for q in candidates:
        path = q.get("image")
        by_image.setdefault(str(path) if path else "", []).append(q)
    shown = list(by_image.items())[:GALLERY_IMAGES]
    n_kept = sum(bool(q.get("kept")) for q in candidates)
    counts = f'{plural(len(candidates), "candidate question")} about {plural(len(by_image), "image")}, {n_kept} kept.'
    parts = [title, f'<p class="meta">{counts}</p>']
    parts += [image_card(path, qs, thumbs) for path, qs in shown]
    left_out = len(by_image) - len(shown)
    if left_out:
        n_questions = sum(len(qs) for _, qs in list(by_image.items())[GALLERY_IMAGES:])
        parts.append(f'<p class="meta">{plural(left_out, "more image")} ({plural(n_questions, "question")}) not shown; '
                     f'all are in iter_{k}/questions.jsonl.</p>')
    return "\n".join(parts)


# -----------------------------------------------------------------------------
# training episodes

def clipped(text, limit=PREVIEW_CHARS) -> str:
    """Model text for a table cell: its first `limit` characters, the whole of it a click away."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return f'<span class="text">{esc(text)}</span>'
    return (f'<span class="text">{esc(text[:limit])}…</span>'
            f'<details><summary>all {len(text):,} characters</summary><pre>{esc(text)}</pre></details>')


def episode_answers(row) -> list[dict]:
    """A Reasoner episode's G answers, those that are records."""
    answers = row.get("answers")
    return [a for a in answers if isinstance(a, dict)] if isinstance(answers, list) else []


def step_rewards(role, rows) -> list:
    """Every reward of a step: a Questioner's per question, a Reasoner's per answer (as the step's
    reward_mean in metrics.jsonl averages them)."""
    if role == "questioner":
        return [row.get("reward") for row in rows]
    return [answer.get("reward") for row in rows for answer in episode_answers(row)]


def questioner_cells(row) -> list[str]:
    """question | the Reasoner's answers | silver, confidence | uncertainty | diversity | reward"""
    answers = row.get("answers") if isinstance(row.get("answers"), list) else []
    if row.get("question") is None or row.get("valid") is False:
        question = f'<span class="badge invalid">invalid</span> {clipped(row.get("raw"))}'
    else:
        question = f'<span class="question">{esc(row["question"])}</span>'
    silver = "(none)" if row.get("silver") is None else row["silver"]
    return [question, answer_tally(answers) or "–", f'<b>{esc(silver)}</b> · {fmt(row.get("confidence"))}',
            fmt(row.get("uncertainty")), fmt(row.get("diversity")), fmt(row.get("reward"))]


def reasoner_cells(row) -> list[str]:
    """question and silver label | the G responses, each with its answer, reward and length"""
    silver = "(none)" if row.get("silver") is None else row["silver"]
    question = (f'<span class="question">{esc(row.get("question"))}</span>'
                f'<div class="meta">silver: <b>{esc(silver)}</b></div>')
    items = []
    for answer in episode_answers(row):
        extracted = "(none)" if answer.get("answer") is None else answer["answer"]
        items.append(f'<li><span class="meta">answer <b>{esc(extracted)}</b> · reward {fmt(answer.get("reward"))} · '
                     f'{fmt(answer.get("length"))} tokens</span><br>{clipped(answer.get("response"))}</li>')
    return [question, f'<ol class="responses">{"".join(items)}</ol>' if items else "–"]


EPISODE_COLUMNS = {"questioner": ["image", "question", "Reasoner's answers", "silver · confidence", "uncertainty",
                                  "diversity", "reward"],
                   "reasoner": ["image", "question", "responses: answer, reward, length"]}


def episode_step(k, role, step, rows, thumbs) -> str:
    """One training step, collapsed: its mean reward and question count, then at most EPISODE_ROWS
    rows; consecutive rows about one image (a Questioner's G questions) share its thumbnail."""
    cells = questioner_cells if role == "questioner" else reasoner_cells
    shown = rows[:EPISODE_ROWS]
    body = []
    for i, row in enumerate(shown):
        image = row.get("image")
        thumb = ""
        if i == 0 or image != shown[i - 1].get("image"):
            span = next((j for j in range(i + 1, len(shown)) if shown[j].get("image") != image), len(shown)) - i
            thumb = f'<td rowspan="{span}">{thumbs.element(image, small=True)}</td>'
        body.append("<tr>" + thumb + "".join(f"<td>{cell}</td>" for cell in cells(row)) + "</tr>")
    summary = (f"step {step}: mean reward {fmt(mean(step_rewards(role, rows)))}, "
               f"{plural(len(rows), 'question')}")
    parts = [f'<details class="step" id="episodes-{k}-{role}-step-{step}"><summary>{summary}</summary>',
             '<table class="episodes"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in EPISODE_COLUMNS[role]) + "</tr>",
             *body, "</table>"]
    if len(rows) > len(shown):
        parts.append(f'<p class="meta">{plural(len(rows) - len(shown), "more question")} of this step not shown; '
                     f'all are in iter_{k}/{role}_episodes.jsonl.</p>')
    parts.append("</details>")
    return "\n".join(parts)


def episode_role(k, role, episodes, thumbs) -> str:
    """One role's steps of iteration k: the first EPISODE_STEPS_FIRST and last EPISODE_STEPS_LAST,
    with a line saying which steps between them are left out."""
    by_step = {}
    for row in episodes:
        if is_int(row.get("step")):
            by_step.setdefault(row["step"], []).append(row)
    steps = sorted(by_step)
    title = f'<h4>{role.capitalize()}</h4>'
    if not steps:
        return title + f'\n<p class="empty">No {role.capitalize()} steps logged.</p>'
    n_rows = sum(len(rows) for rows in by_step.values())
    parts = [title, f'<p class="meta">{plural(len(steps), "step")}, {plural(n_rows, "question")}.</p>']
    first, last = steps[:EPISODE_STEPS_FIRST], steps[max(EPISODE_STEPS_FIRST, len(steps) - EPISODE_STEPS_LAST):]
    parts += [episode_step(k, role, step, by_step[step], thumbs) for step in first]
    left_out = steps[len(first):len(steps) - len(last)]
    if left_out:
        which = f"step {left_out[0]}" if len(left_out) == 1 else f"steps {left_out[0]}–{left_out[-1]}"
        parts.append(f'<p class="meta">{plural(len(left_out), "step")} not shown ({which}); '
                     f'all are in iter_{k}/{role}_episodes.jsonl.</p>')
    parts += [episode_step(k, role, step, by_step[step], thumbs) for step in last]
    return "\n".join(parts)


def episodes_section(k, episodes, thumbs) -> str:
    """Iteration k's training episodes, per role; episodes: {role: rows of iter_k/<role>_episodes.jsonl}."""
    title = f'<h3 id="episodes-{k}">Iteration {k}</h3>'
    if not any(episodes.values()):
        return title + '\n<p class="empty">No training episodes yet.</p>'
    return "\n".join([title] + [episode_role(k, role, episodes[role], thumbs) for role in TRAINING_PHASES])


def skipped_section(run_dir) -> str:
    """The unreadable input files the run listed, collapsed; nothing when there is no list."""
    path = Path(run_dir, "skipped_images.txt")
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    rows = []
    for line in lines:
        file, _, reason = line.partition("\t")
        rows.append(f"<tr><td>{esc(file)}</td><td>{esc(reason)}</td></tr>")
    return (f'<h2 id="skipped">Skipped images</h2>\n'
            f'<details><summary>{plural(len(lines), "input file")} could not be read</summary>\n'
            f'<table><tr><th>file</th><th>reason</th></tr>\n' + "\n".join(rows) + "\n</table></details>")


def flatten(config, prefix="") -> dict:
    """Nested dicts as dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_section(config) -> str:
    if not config:
        return '<h2 id="config">Config</h2>\n<p class="empty">No config.json.</p>'
    rows = [f"<tr><td>{esc(key)}</td><td><code>{esc(json.dumps(value, ensure_ascii=False))}</code></td></tr>"
            for key, value in flatten(config).items()]
    return '<h2 id="config">Config</h2>\n<table class="config">\n' + "\n".join(rows) + "\n</table>"

# -----------------------------------------------------------------------------
# the page

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2937;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #e5e7eb; }
nav a { margin-right: 1rem; }
.meta { color: #6b7280; font-size: 0.9rem; margin: 0.2rem 0; }
.status { font-weight: 600; }
.empty { color: #9ca3af; font-style: italic; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 0.3rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } #summary-table td { white-space: nowrap; } tr:nth-child(even) td { background: #fafafa; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 1.5rem 1rem; }
figure { margin: 0; } figcaption { font-weight: 600; font-size: 0.95rem; }
svg { width: 100%; height: auto; font-size: 12px; fill: #374151; }
svg .grid { stroke: #e5e7eb; } svg .axis { stroke: #6b7280; } svg .label { font-size: 13px; }
.card { display: flex; gap: 1rem; border: 1px solid #e5e7eb; border-radius: 6px; padding: 0.7rem; margin: 0.7rem 0; }
.side { flex: 0 0 164px; }
.thumb { width: 160px; height: 160px; display: block; background-position: center; background-size: contain;
         background-repeat: no-repeat; }
.thumb.small { width: 96px; height: 96px; }
.missing { height: 100px; background-color: #f3f4f6; color: #9ca3af; display: flex; text-align: center;
           align-items: center; justify-content: center; font-size: 0.85rem; }
.thumb.small.missing { height: 60px; }
.name { font-size: 0.8rem; word-break: break-all; margin-top: 0.3rem; }
.questions { list-style: none; padding: 0; margin: 0; flex: 1; min-width: 0; }
.questions > li { border-bottom: 1px solid #f3f4f6; padding: 0.4rem 0; }
.badge { display: inline-block; font-size: 0.75rem; padding: 0 0.4rem; border-radius: 3px; color: white; }
.kept { background: #059669; } .dropped { background: #9ca3af; } .invalid { background: #dc2626; }
.wrong { background: #b45309; }
#summary-table td.categories { white-space: normal; min-width: 14rem; }
table.episodes { width: 100%; table-layout: auto; } table.episodes td { font-size: 0.85rem; }
.text { white-space: pre-wrap; word-break: break-word; }
.responses { margin: 0; padding-left: 1.3rem; } .responses li { margin-bottom: 0.4rem; }
details.step { border: 1px solid #e5e7eb; border-radius: 6px; padding: 0.3rem 0.6rem; margin: 0.4rem 0; }
details { margin: 0.2rem 0; font-size: 0.9rem; } summary { cursor: pointer; color: #4b5563; }
pre { white-space: pre-wrap; word-break: break-word; background: #f9fafb; padding: 0.4rem;
      max-height: 16rem; overflow: auto; font-size: 0.8rem; margin: 0.2rem 0 0.5rem; }
code { font-size: 0.85rem; }
"""


def render(run_dir) -> str:
    """The whole page for run_dir as one string."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json")
    state = read_json(run_dir / "state.json")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    folders = iteration_folders(run_dir)
    questions = {k: read_jsonl(folder / "questions.jsonl") for k, folder in folders.items()}
    summaries = lines_by_iteration(metrics, "summary")
    logged = {line["iteration"] for line in metrics if is_int(line.get("iteration"))}
    iterations = sorted(set(folders) | logged)
    thumbs = Thumbnails()
    galleries = [gallery(k, questions.get(k, []), thumbs) for k in iterations]
    episodes = [episodes_section(k, {role: read_jsonl(folders[k] / f"{role}_episodes.jsonl") if k in folders else []
                                     for role in TRAINING_PHASES}, thumbs) for k in iterations]
    nav = " ".join(f'<a href="#{target}">{label}</a>' for target, label in
                   [("summary", "Summary"), ("curves", "Curves"), ("gallery", "Questions"),
                    ("episodes", "Training episodes"), ("config", "Config")])
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{esc(run_dir.resolve().name)} · visplay report</title>',
        f"<style>{STYLE}</style>",
        f"<style>\n{thumbs.style()}\n</style></head>",
        "<body>",
        header(run_dir, config, state, metrics, folders, summaries),
        f"<nav>{nav}</nav>",
        summary_table(iterations, metrics, questions, summaries),
        charts(metrics, config),
        '<h2 id="gallery">Questions</h2>',
        *(galleries or ['<p class="empty">No iterations yet.</p>']),
        '<h2 id="episodes">Training episodes</h2>',
        f'<p class="meta">Per iteration and role, the first {EPISODE_STEPS_FIRST} and last {EPISODE_STEPS_LAST} '
        f'training steps, at most {EPISODE_ROWS} questions each; iter_&lt;k&gt;/&lt;role&gt;_episodes.jsonl '
        'has every one.</p>' if episodes else "",
        *(episodes or ['<p class="empty">No iterations yet.</p>']),
        skipped_section(run_dir),
        config_section(config),
        "</body>",
        "</html>",
    ]) + "\n"


def write_report(run_dir) -> Path:
    """Write run_dir/report.html atomically (temp file in the same folder, then os.replace); return its path."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise NotADirectoryError(f"'{run_dir}' is a file, not a run folder: pass the folder that holds "
                                 "config.json and metrics.jsonl, e.g. runs/<name>")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist; pass a run folder, e.g. runs/<name>")
    page = render(run_dir)
    target = run_dir / "report.html"
    tmp = run_dir / f".report.html.{os.getpid()}.tmp"  # not mkstemp: its 0600 mode would stick to the report
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)  # same folder, same file system: readers see the old page or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def main(argv=None) -> int:
    """The command line: prints the report's path; returns the exit code (2: a one-line error)."""
    parser = argparse.ArgumentParser(description="Write runs/<name>/report.html for a visplay run folder.")
    parser.add_argument("run_dir", help="the run folder, e.g. runs/<name>")
    run_dir = parser.parse_args(argv).run_dir
    try:
        print(write_report(run_dir))
    except OSError as err:  # no such folder, a file, a folder we may not write to
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
