"""
The ablation page: the summary ablate.py writes (ablation.json) as one self-contained HTML page.

The page shows, top to bottom:
- the study's title and command, and the base model's scores (iteration 0 of every arm);
- one plot: for each arm (a variant of the method, `method` being the method itself, the thick dark
  line drawn on top), the Reasoner's greedy accuracy on the held-out questions after each self-play
  iteration, "base" being iteration 0, the shared base model. The line joins the means over runs
  (seeds); the shaded band around it is their 95% interval;
- a table of the arms: the last iteration's greedy accuracy (mean and interval) and the paired
  difference to `method` (arm minus method, run by run on the same questions, with its interval);
- the last iteration's accuracy per question category and arm, when the summary has it.

How to read it: an arm whose paired difference's interval excludes 0 differs from the method at
these seeds; where it includes 0 the study cannot tell them apart. The intervals are ablate.py's
95% bootstrap intervals (runs and questions resampled); this page only draws them. A missing value
(a run not finished) is left out: its point is skipped and its cell shows "–".

    from tools.ablation_page import page
    Path("ablation.html").write_text(page(summary), encoding="utf-8")
"""

from tools.report import STYLE, esc, is_int, number

METHOD = "method"
METHOD_COLOR = "#111827"
# Tableau 10: ten hues that stay apart on white; an 11th arm reuses the first
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]
BASE_SCORES = [("greedy", "greedy"), ("pass1", "pass@1"), ("maj", "majority vote"),
               ("blind", "blind (each question shown another image)")]

PLOT_W, PLOT_H = 900, 420
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 14, 50  # margins, px

EXTRA_STYLE = """
.legend { list-style: none; padding: 0; margin: 0.6rem 0; display: flex; flex-wrap: wrap; gap: 0.3rem 1.4rem; }
.legend li { display: flex; align-items: center; gap: 0.4rem; font-size: 0.9rem; word-break: break-all; }
.swatch { display: inline-block; width: 26px; flex: none; border-top: 3px solid; height: 0; vertical-align: middle; }
.swatch.method { border-top-width: 5px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.arm { word-break: break-all; }
"""

# -----------------------------------------------------------------------------
# reading the summary (every field but the arms' names may be missing or None)

def interval(value):
    """(low, high) from a [low, high] pair of numbers, else None."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = map(number, value)
        if low is not None and high is not None:
            return low, high
    return None


def curve(arm) -> list[tuple]:
    """An arm's (iteration, mean, interval or None) in iteration order; points without a mean are skipped."""
    points = []
    for point in arm.get("curve") or []:
        if isinstance(point, dict) and is_int(point.get("iteration")) and number(point.get("mean")) is not None:
            points.append((point["iteration"], number(point["mean"]), interval(point.get("ci95"))))
    return sorted(points, key=lambda p: p[0])


def arms_of(summary) -> dict:
    """{name: arm dict}, method first, the rest in the summary's order (ablate.py's)."""
    arms = summary.get("arms") if isinstance(summary.get("arms"), dict) else {}
    arms = {str(name): arm if isinstance(arm, dict) else {} for name, arm in arms.items()}
    return dict(sorted(arms.items(), key=lambda item: item[0] != METHOD))


def colors(names) -> dict:
    others = [name for name in names if name != METHOD]
    return {name: METHOD_COLOR if name == METHOD else PALETTE[others.index(name) % len(PALETTE)] for name in names}

# -----------------------------------------------------------------------------
# formatting

def pct(value) -> str:
    x = number(value)
    return "–" if x is None else f"{100 * x:.1f}%"


def pct_interval(value, sign="") -> str:
    ci = interval(value)
    return "–" if ci is None else f"[{100 * ci[0]:{sign}.1f}, {100 * ci[1]:{sign}.1f}]"


def swatch(name, palette) -> str:
    """A short stroke in the arm's colour, as in the plot (thicker for the method)."""
    return f'<span class="swatch{" method" if name == METHOD else ""}" style="border-color: {palette[name]}"></span> '


def points_diff(value) -> str:
    x = number(value)
    return "–" if x is None else f"{100 * x:+.1f} pts"

# -----------------------------------------------------------------------------
# the plot

def px(iteration, last) -> float:
    """x pixel of an iteration on an axis from 0 (base) to `last`."""
    return LEFT + iteration / last * (PLOT_W - LEFT - RIGHT)


def py(accuracy) -> float:
    """y pixel of an accuracy in [0, 1]: 0 at the bottom of the plot area, 1 at its top."""
    return PLOT_H - BOTTOM - accuracy * (PLOT_H - TOP - BOTTOM)


def plot(arms, palette) -> str:
    """The SVG: axes, one band per arm, then one line per arm with a marker (and tooltip) per point."""
    curves = {name: curve(arm) for name, arm in arms.items()}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return '<p class="empty">No accuracies yet.</p>'
    last = max(1, max(i for points in curves.values() for i, _, _ in points))
    left, right, bottom = LEFT, PLOT_W - RIGHT, PLOT_H - BOTTOM
    parts = []
    for tick in range(0, 101, 20):
        y = py(tick / 100)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}%</text>')
    for i in range(last + 1):
        x = px(i, last)
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" class="axis"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{"base" if i == 0 else i}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/>')
    parts.append(f'<line x1="{left}" y1="{TOP}" x2="{left}" y2="{bottom}" class="axis"/>')
    parts.append(f'<text x="{(left + right) / 2:.0f}" y="{PLOT_H - 6}" text-anchor="middle" class="label">'
                 'self-play iteration</text>')
    mid = (TOP + bottom) / 2
    parts.append(f'<text x="14" y="{mid:.0f}" text-anchor="middle" transform="rotate(-90 14 {mid:.0f})" '
                 'class="label">greedy accuracy, held-out questions</text>')
    # method last, so its line lies on top; every band before any line, so no band hides a line
    order = sorted(curves, key=lambda name: name == METHOD)
    for name in order:
        band = [(i, ci) for i, _, ci in curves[name] if ci is not None]
        if len(band) >= 2:
            edge = [f"{px(i, last):.1f},{py(ci[1]):.1f}" for i, ci in band]
            edge += [f"{px(i, last):.1f},{py(ci[0]):.1f}" for i, ci in reversed(band)]
            parts.append(f'<polygon class="band" points="{" ".join(edge)}" fill="{palette[name]}" '
                         f'fill-opacity="{0.10 if name == METHOD else 0.08}" stroke="none"/>')
        elif band:  # one interval has no width to shade: an error bar instead
            (i, (low, high)), = band
            parts.append(f'<line class="band" x1="{px(i, last):.1f}" y1="{py(low):.1f}" x2="{px(i, last):.1f}" '
                         f'y2="{py(high):.1f}" stroke="{palette[name]}" stroke-width="2" stroke-opacity="0.5"/>')
    for name in order:
        width, radius = (3.2, 4) if name == METHOD else (1.8, 3)
        coords = " ".join(f"{px(i, last):.1f},{py(m):.1f}" for i, m, _ in curves[name])
        parts.append(f'<polyline class="line" data-arm="{esc(name)}" points="{coords}" fill="none" '
                     f'stroke="{palette[name]}" stroke-width="{width}" stroke-linejoin="round">'
                     f'<title>{esc(name)}</title></polyline>')
        for i, m, ci in curves[name]:
            tip = f"{name}, {'base' if i == 0 else f'iteration {i}'}: {pct(m)}" + (
                f" {pct_interval(ci)}" if ci else "")
            parts.append(f'<circle cx="{px(i, last):.1f}" cy="{py(m):.1f}" r="{radius}" fill="{palette[name]}">'
                         f'<title>{esc(tip)}</title></circle>')
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {PLOT_W} {PLOT_H}" width="{PLOT_W}" '
            f'height="{PLOT_H}" role="img"><title>greedy accuracy per iteration and arm</title>\n{body}\n</svg>')


def legend(names, palette) -> str:
    """HTML rather than SVG, so that long arm names wrap instead of running out of the plot."""
    items = [f"<li>{swatch(name, palette)}{esc(name)}</li>" for name in names]
    return f'<ul class="legend">{"".join(items)}</ul>'

# -----------------------------------------------------------------------------
# the tables

def arms_table(arms, palette) -> str:
    head = ["arm", "iterations", "greedy, last iteration", "95% interval", "paired difference to method",
            "95% interval"]
    rows = []
    for name, arm in arms.items():
        points = curve(arm)
        diff = arm.get("paired_diff") if isinstance(arm.get("paired_diff"), dict) else {}
        cells = [str(points[-1][0]) if points else "–", pct(arm.get("mean")), pct_interval(arm.get("ci95")),
                 points_diff(diff.get("mean")), pct_interval(diff.get("ci95"), sign="+")]
        rows.append(f'<tr><td class="arm">{swatch(name, palette)}{esc(name)}</td>'
                    + "".join(f'<td class="num">{cell}</td>' for cell in cells) + "</tr>")
    return ('<table id="arms"><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n"
            + "\n".join(rows) + "\n</table>")


def categories_table(base, arms, palette) -> str:
    """Rows: the base model, then each arm; columns: every category any of them has. Nothing when none has one."""
    rows = {"base": base.get("by_category")} | {name: arm.get("by_category") for name, arm in arms.items()}
    rows = {name: cats for name, cats in rows.items() if isinstance(cats, dict) and cats}
    if not rows:
        return ""
    categories = list(dict.fromkeys(str(c) for cats in rows.values() for c in cats))
    lines = []
    for name, cats in rows.items():
        cats = {str(c): v for c, v in cats.items()}
        label = '<i>base model</i>' if name == "base" else swatch(name, palette) + esc(name)
        lines.append(f'<tr><td class="arm">{label}</td>'
                     + "".join(f'<td class="num">{pct(cats.get(c))}</td>' for c in categories) + "</tr>")
    return ('<h2 id="categories">Per category, last iteration</h2>\n<table id="by-category"><tr><th>arm</th>'
            + "".join(f"<th>{esc(c)}</th>" for c in categories) + "</tr>\n" + "\n".join(lines) + "\n</table>")

# -----------------------------------------------------------------------------
# the page

def page(summary: dict) -> str:
    """The whole ablation page for ablate.py's summary, as one string."""
    arms = arms_of(summary)
    title = summary.get("title") or f"Ablation: {len(arms)} arms"
    base = summary.get("base") if isinstance(summary.get("base"), dict) else {}
    palette = colors(arms)
    scores = ", ".join(f"{label} {pct(base.get(key))}" for key, label in BASE_SCORES if key in base)
    command = summary.get("command")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{STYLE}{EXTRA_STYLE}</style></head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">command: <code>{esc(command)}</code></p>' if command else "",
        f'<p class="meta">Base model (iteration 0 of every arm): {scores}.</p>' if scores else "",
        '<h2 id="curves">Greedy accuracy per iteration</h2>',
        '<p class="meta">Mean over runs (seeds); the band is its 95% interval, runs and questions resampled '
        '(from ablate.py). Hover a point for its value.</p>',
        legend(arms, palette),
        f"<figure>{plot(arms, palette)}</figure>",
        '<h2 id="arms-table">Arms</h2>',
        '<p class="meta">Paired difference: the arm minus the method, run by run on the same questions, in '
        'percentage points, with its 95% interval (from ablate.py); an interval that excludes 0 is a difference '
        'these seeds can tell.</p>',
        arms_table(arms, palette) if arms else '<p class="empty">No arms.</p>',
        categories_table(base, arms, palette),
        "</body>",
        "</html>",
    ]) + "\n"
