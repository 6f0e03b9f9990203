"""METHOD.md stays true to the code: every `module.function` it cites exists, and its equations are
numbered (1), (2), ... in order, each followed by at least one citation before the next."""

import importlib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# every module of the repo by its file's name: `grpo.update`, `policies.Trainee` (machinery/), `report.main` (tools/)
MODULES = {name[:-3]: (f"{folder}.{name[:-3]}" if folder else name[:-3])
           for folder in ("", "machinery", "tools") for name in os.listdir(os.path.join(ROOT, folder))
           if name.endswith(".py") and name != "__init__.py"}
CITATION = re.compile(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)`")  # `rewards.extract_boxed`; not `a.b.c`
EQUATION = re.compile(r"^\*\*\((\d+)\)\*\*", re.MULTILINE)  # a line starting with **(5)**


def method_text():
    with open(os.path.join(ROOT, "METHOD.md"), encoding="utf-8") as f:
        return f.read()


def citations(text):
    """(module, name) of every backticked `module.name` whose module is a .py file of the repo (so
    `config.json` and `rewards.py` are not citations)."""
    return [(m, n) for m, n in CITATION.findall(text) if m in MODULES and n != "py"]


def test_every_cited_function_exists():
    cited = citations(method_text())
    assert len(cited) > 20, "METHOD.md should cite the functions that implement its equations"
    missing = sorted({f"{m}.{n}" for m, n in cited if not hasattr(importlib.import_module(MODULES[m]), n)})
    assert not missing, f"METHOD.md cites names the code does not have: {', '.join(missing)}"


def test_equations_are_numbered_in_order_and_each_cites_code():
    text = method_text()
    found = list(EQUATION.finditer(text))
    numbers = [int(m.group(1)) for m in found]
    assert numbers == list(range(1, len(numbers) + 1)), f"equations numbered {numbers}"
    ends = [m.start() for m in found[1:]] + [len(text)]
    uncited = [n for n, m, end in zip(numbers, found, ends) if not citations(text[m.end():end])]
    assert not uncited, f"equations with no `module.function` after them: {uncited}"
