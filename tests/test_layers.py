"""The layout: the method files read on their own, the machinery lives apart, and the loop stays the
algorithm. Each check reads the source (its imports and its functions' shapes), not a list kept by hand."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHOD = ("rewards", "grpo", "sampler", "questioner", "reasoner")
FOUNDATIONS = ("model", "data")  # the model and the data the method stands on
FOLDERS = ("machinery", "tools")  # the machinery, and the commands beside the method


def tree(module):
    return ast.parse((REPO / f"{module.replace('.', '/')}.py").read_text())


def first_party_imports(module):
    """The repo's own modules that `module` imports, as dotted names (machinery.lora, grpo, ...)."""
    ours = {p.stem for p in REPO.glob("*.py")} | set(FOLDERS)
    found = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [f"{node.module}.{alias.name}" if node.module in FOLDERS else node.module for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in ours}
    return found


@pytest.mark.parametrize("module", METHOD)
def test_a_method_file_imports_only_the_method_and_its_foundations(module):
    imported = first_party_imports(module)
    assert imported <= set(METHOD) | set(FOUNDATIONS), f"{module}.py imports {sorted(imported)}"


def test_the_foundations_import_no_method_and_no_command():
    for module in FOUNDATIONS:
        imported = first_party_imports(module)
        # model.py's one speed path is the vision tower's windowed attention
        assert imported <= set(FOUNDATIONS) | {"rewards", "machinery.vision_attention"}, (module, imported)


def test_the_check_sees_an_import_of_the_machinery(tmp_path, monkeypatch):
    """The import check above can fail: a method file that imports the machinery is caught."""
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    (tmp_path / "model.py").write_text("")
    (tmp_path / "grpo.py").write_text("import torch\nfrom machinery import distributed as dist\nimport model\n")
    assert first_party_imports("grpo") == {"machinery.distributed", "model"}


def function(module, name):
    return next(node for node in ast.walk(tree(module)) if isinstance(node, ast.FunctionDef) and node.name == name)


def test_the_method_files_stay_short():
    lines = {module: len((REPO / f"{module}.py").read_text().splitlines()) for module in ("grpo", "sampler")}
    assert lines["grpo"] <= 250 and lines["sampler"] <= 200, lines


ROLE_FUNCTIONS = [("questioner", "write_questions"), ("questioner", "score_questions"), ("questioner", "rollouts"),
                  ("reasoner", "ask_and_vote"), ("reasoner", "curate"), ("reasoner", "rollouts")]


@pytest.mark.parametrize("module, name", ROLE_FUNCTIONS)
def test_a_role_function_takes_a_handful_of_parameters(module, name):
    args = function(module, name).args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
    assert count <= 6, f"{module}.{name} takes {count} parameters"


def test_the_loop_reads_as_the_algorithm():
    """selfplay.train: a short body that hands the roles from phase to phase as values."""
    loop = function("selfplay", "train")
    body = loop.body[1:] if isinstance(loop.body[0].value, ast.Constant) else loop.body  # without the docstring
    assert body[-1].end_lineno - body[0].lineno + 1 <= 40
    source = ast.unparse(loop)
    for line in ("Q = run.phase('questioner', train_questioner, cfg, run, Q, R, images)",
                 "kept = run.phase('curation', curate, cfg, run, Q, R, images)",
                 "R = run.phase('reasoner', train_reasoner, cfg, run, R, kept, images)"):
        assert line in source


def test_the_readme_lists_every_file_of_the_layers():
    """README's "The files" names every module, one line each, so the tree cannot fall behind."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## The files"):]
    block = block[block.index("```") + 3:]
    listed = {line.split()[0] for line in block[:block.index("```")].splitlines() if line and not line.startswith("#")}
    modules = {p.name for p in REPO.glob("*.py")} | {f"{folder}/{p.name}" for folder in FOLDERS
                                                     for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
    assert modules <= listed, f"missing from README's files: {sorted(modules - listed)}"
    assert all((REPO / name.rstrip("/")).exists() for name in listed), sorted(n for n in listed
                                                                           if not (REPO / n.rstrip("/")).exists())
