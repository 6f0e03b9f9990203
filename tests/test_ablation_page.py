"""tools/ablation_page.py: the page parses, draws one line per arm at the right heights, escapes what
a user named, and survives missing values."""

import re
from html.parser import HTMLParser

from tools import ablation_page


def summary():
    point = lambda i, m: {"iteration": i, "mean": m, "ci95": [m - 0.05, m + 0.05]}
    return {"command": "python ablate.py OUT", "base": {"greedy": 0.3, "pass1": 0.4, "maj": 0.5, "blind": 0.2,
                                                        "by_category": {"counting": 0.1}},
            "arms": {"method": {"mean": 0.8, "ci95": [0.75, 0.85], "paired_diff": None,
                                "curve": [point(0, 0.3), point(1, 0.6), point(2, 0.8)],
                                "by_category": {"counting": 0.7}},
                     "<script>alert(1)</script>": {"mean": 0.5, "ci95": [0.45, 0.55],
                                                   "paired_diff": {"mean": -0.3, "ci95": [-0.35, -0.25]},
                                                   "curve": [point(0, 0.3), {"iteration": 1, "mean": 0.5,
                                                                             "ci95": [0.4, 0.6]}]},
                     "unfinished": {"mean": None, "ci95": None, "paired_diff": None,
                                    "curve": [point(0, 0.3), {"iteration": 1, "mean": None, "ci95": None}]}}}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_one_line_per_arm_at_the_heights_of_its_means():
    html = ablation_page.page(summary())
    parser = Tags()
    parser.feed(html)
    lines = {a["data-arm"]: a["points"].split() for t, a in parser.tags if t == "polyline"}
    assert set(lines) == {"method", "<script>alert(1)</script>", "unfinished"}
    assert [len(lines[k]) for k in ("method", "<script>alert(1)</script>", "unfinished")] == [3, 2, 1]
    y = float(lines["method"][1].split(",")[1])  # iteration 1 at 60%: measured from the plot area's bottom
    plot_height = ablation_page.PLOT_H - ablation_page.TOP - ablation_page.BOTTOM
    assert abs(y - (ablation_page.PLOT_H - ablation_page.BOTTOM - 0.6 * plot_height)) < 0.1


def test_a_hostile_arm_name_is_text():
    html = ablation_page.page(summary())
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"<script", html, re.I)


VOID_TAGS = {"br", "hr", "img", "input", "link", "meta", "wbr"}


class Balanced(HTMLParser):
    """Fails on a closing tag that does not close the last one opened; keeps the text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # the SVG's self-closed <line .../>: nothing left open
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_parses_and_every_tag_closes():
    parser = Balanced()
    parser.feed(ablation_page.page(summary()))
    parser.close()
    assert parser.stack == []
    text = " ".join(parser.text)
    assert "<script>alert(1)</script>" in text  # shown to the reader as the name it is
    assert "-30.0 pts" in text and "80.0%" in text and "[75.0, 85.0]" in text


def test_x_ticks_and_the_longest_arm_sets_the_axis():
    parser = Tags()
    page = ablation_page.page(summary())
    parser.feed(page)
    # method runs to iteration 2, so the axis does: x of iteration k is LEFT + k/2 of the plot width
    method = next(a for t, a in parser.tags if t == "polyline" and a["data-arm"] == "method")
    xs = [float(p.split(",")[0]) for p in method["points"].split()]
    width = ablation_page.PLOT_W - ablation_page.LEFT - ablation_page.RIGHT
    assert [round(x, 1) for x in xs] == [round(ablation_page.LEFT + k / 2 * width, 1) for k in range(3)]
    assert re.search(r'text-anchor="middle">base</text>', page) and ">2</text>" in page and ">3</text>" not in page
    assert all(f">{tick}%</text>" in page for tick in (0, 20, 40, 60, 80, 100))


def test_missing_values_and_missing_fields_are_left_out():
    s = summary()
    s["arms"]["method"]["curve"][1] = {"iteration": 1, "mean": None, "ci95": [None, 0.7]}
    s["arms"]["bare"] = {}  # nothing but a name
    s.pop("command")
    s["base"] = {}
    page = ablation_page.page(s)
    parser = Tags()
    parser.feed(page)
    lines = {a["data-arm"]: a["points"].split() for t, a in parser.tags if t == "polyline"}
    assert len(lines["method"]) == 2 and "bare" not in lines  # the None point skipped, no line without points
    assert "bare" in page and "command:" not in page and "Base model" not in page
    # a band needs two intervals: method keeps its two, the one-point arm gets an error bar, not a polygon
    bands = [t for t, a in parser.tags if a.get("class") == "band"]
    assert sorted(bands) == ["line", "polygon", "polygon"]


def test_an_empty_summary_still_makes_a_page():
    page = ablation_page.page({})
    assert "No accuracies yet." in page and "No arms." in page and page.rstrip().endswith("</html>")


def test_categories_are_a_table_of_base_and_arms_escaped():
    s = summary()
    s["arms"]["method"]["by_category"] = {"<b>colour</b>": 0.25, "counting": 0.7}
    page = ablation_page.page(s)
    table = page[page.index('id="by-category"'):]
    assert "&lt;b&gt;colour&lt;/b&gt;" in table and "<b>colour" not in page
    assert "base model" in table and "25.0%" in table and "70.0%" in table
    assert "by-category" not in ablation_page.page({"arms": {"method": {"curve": []}}})
