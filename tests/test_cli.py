"""cli.parse and cli.parse_given: flags generated from a config dataclass."""

import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import evaluate
import selfplay
from machinery import cli
from machinery.cli import AT_LEAST_1, POSITIVE, PROBABILITY, option, parse, parse_given
from tools import bench


@dataclass
class Example:
    models: list[str] = option("repeatable and required")
    lr: float = option("a float", default=1e-6, group="grpo")
    steps: int = option("an int", default=3)
    limit: int | None = option("an optional int", default=None)
    mode: str = option("one of two", choices=("paper", "code"), default="paper")
    quiet: bool = option("a switch", default=False)
    fresh: list[str] = option("a default from a factory", default_factory=lambda: ["x"])
    top_p: float = option("a probability", valid=PROBABILITY, default=1.0)
    sizes: list[int] = option("each at least 1", valid=AT_LEAST_1, default_factory=list)
    cap: int | None = option("an optional int, at least 1", valid=AT_LEAST_1, default=None)
    rate: float = option("more than 0", valid=POSITIVE, default=1e-6)


def test_types_defaults_and_repeats():
    cfg = parse(Example, ["--models", "a", "--models", "b", "--lr", "0.5", "--limit", "7", "--quiet"])
    assert cfg == Example(models=["a", "b"], lr=0.5, steps=3, limit=7, mode="paper", quiet=True, fresh=["x"],
                          top_p=1.0, sizes=[], cap=None, rate=1e-6)
    assert isinstance(cfg.lr, float) and isinstance(cfg.limit, int)
    assert parse(Example, ["--models", "a", "--no-quiet", "--mode", "code"]).mode == "code"


@pytest.mark.parametrize("argv", [[], ["--models", "a", "--mode", "other"], ["--models", "a", "--steps", "x"]])
def test_bad_command_lines_exit_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(Example, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and ": error: " in err and err.endswith("(see --help)\n")
    assert "usage:" not in err  # the usage text buries the one line that matters


def test_help_shows_groups_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(Example, ["--help"])
    text = capsys.readouterr().out
    assert "grpo:" in text and "(default: 1e-06)" in text and "{paper,code}" in text


@pytest.mark.parametrize("argv, needle", [
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], not 0"),
    (["--top-p", "1.01"], "argument --top-p: must be in (0, 1], not 1.01"),
    (["--sizes", "3", "--sizes", "0"], "argument --sizes: must be at least 1, not 0"),
    (["--cap", "-2"], "argument --cap: must be at least 1, not -2"),
    (["--cap", "two"], "argument --cap: invalid int value: 'two'"),
    # negatives in notations argparse alone takes for flags ("expected one argument")
    (["--rate", "-1e-5"], "argument --rate: must be more than 0, and finite, not -1e-5"),
    (["--rate", "-2E+3"], "argument --rate: must be more than 0, and finite, not -2E+3"),
    (["--rate", "-.5"], "argument --rate: must be more than 0, and finite, not -.5"),
    (["--rate", "-inf"], "argument --rate: must be more than 0, and finite, not -inf"),
    (["--sizes", "-1e3"], "argument --sizes: invalid int value: '-1e3'"),
    (["--rate", "inf"], "argument --rate: must be more than 0, and finite, not inf"),  # passed once, then failed at step 1
    (["--rate", "nan"], "argument --rate: must be more than 0, and finite, not nan"),
])
def test_values_out_of_range_are_refused_naming_the_flag(argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(Example, ["--models", "a"] + argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.endswith(f": error: {needle} (see --help)\n")


def test_values_in_range_pass():
    cfg = parse(Example, ["--models", "a", "--top-p", "0.5", "--sizes", "1", "--sizes", "9", "--cap", "1"])
    assert (cfg.top_p, cfg.sizes, cfg.cap) == (0.5, [1, 9], 1)


def test_parse_given_names_the_flags_given_even_at_their_default():
    cfg, given = parse_given(Example, ["--models", "a", "--rate", "1e-6", "--no-quiet", "--sizes", "2"])
    assert cfg == parse(Example, ["--models", "a", "--rate", "1e-6", "--no-quiet", "--sizes", "2"])
    assert given == frozenset({"models", "rate", "quiet", "sizes"}) and cfg.rate == 1e-6 and not cfg.quiet
    assert parse_given(Example, ["--models", "a"])[1] == {"models"}


def test_a_negative_value_reaches_a_field_that_takes_it():
    assert parse(Example, ["--models", "a", "--limit", "-3", "--lr", "-1.5e-3"]).lr == -1.5e-3


@pytest.mark.parametrize("config", [selfplay.Config, evaluate.EvalConfig, bench.Config])
def test_every_default_is_in_its_range(config):
    """Defaults never go through the flag's check, so they are checked here."""
    checked = [f for f in dataclasses.fields(config) if f.metadata["valid"] is not None]
    assert checked
    for f in checked:
        test, what = f.metadata["valid"]
        assert f.default is None or test(f.default), f"{config.__module__}.{f.name} = {f.default} is not {what}"


def test_progress_in_a_log_file_is_lines(capsys):
    """Where stderr is not a terminal (capsys: a log file's case), a bar is whole lines, no carriage
    returns, the last one the finished count; a bar it disables writes nothing."""
    assert list(cli.progress(range(5), desc="step")) == list(range(5))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and 1 <= len(lines) <= 3, err
    assert lines[0].startswith("step:") and "0/5" in lines[0] and "5/5" in lines[-1]
    list(cli.progress(range(5), desc="step", disable=True))
    assert capsys.readouterr().err == ""
    bar = cli.progress(range(200), desc="step")  # a postfix every step: no line of its own
    for i in bar:
        bar.set_postfix(reward=i)
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= len(lines) <= 3 and "200/200" in lines[-1] and "reward=199" in lines[-1], lines


def test_progress_without_a_stderr_runs_silently(monkeypatch):
    """A closed stderr (`2>&-`) is no reason to stop: the bar draws nothing."""
    monkeypatch.setattr(sys, "stderr", None)
    assert list(cli.progress(range(3), desc="step")) == [0, 1, 2]
    assert list(cli.progress(range(3), desc="step", disable=True)) == [0, 1, 2]


# -----------------------------------------------------------------------------
# Presets

def test_a_preset_says_what_its_flags_say_and_a_later_flag_wins(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('# a comment\nmodels = ["a", "b"]\nrate = 0.5\nsteps = 7\nquiet = true\nmode = "code"\n')
    cfg, given = parse_given(Example, [str(preset), "--rate", "0.25"])
    assert cfg == parse(Example, ["--models", "a", "--models", "b", "--steps", "7", "--quiet", "--mode", "code",
                                  "--rate", "0.25"])
    assert given == {"models", "rate", "steps", "quiet", "mode"}, "a preset's settings count as given"
    preset.write_text("models = ['a']\nquiet = false\n")
    assert parse(Example, [str(preset), "--quiet"]).quiet and not parse(Example, [str(preset)]).quiet


@pytest.mark.parametrize("text, needle", [
    ("models = ['a']\nrate = 0\n", "argument --rate: must be more than 0, and finite, not 0"),  # the flag's own check
    ("models = ['a']\nwidth = 3\n", "sets 'width', which is not a setting of this command"),
    ("models = ['a']\nquiet = 'yes'\n", "sets quiet = 'yes': true or false"),
    ("models = ['a']\nsteps = [1, 2]\n", "sets steps = [1, 2]: one int"),
    ("models = ['a']\nsteps = 2.5\n", "argument --steps: invalid int value: '2.5'"),
    ("models = ['a'\n", "cannot read the preset"),
])
def test_a_bad_preset_is_one_line(tmp_path, capsys, text, needle):
    preset = tmp_path / "p.toml"
    preset.write_text(text)
    with pytest.raises(SystemExit) as stop:
        parse(Example, [str(preset)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_a_missing_preset_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(Example, [str(tmp_path / "none.toml")])
    assert stop.value.code == 2 and "cannot read the preset" in capsys.readouterr().err


PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").rglob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_of_the_repo_is_a_selfplay_config(preset):
    cfg, given = parse_given(selfplay.Config, [str(preset)])  # a misspelt setting or a bad value exits 2
    selfplay.check_bounds(cfg)
    assert given == set(tomllib.loads(preset.read_text()))


def test_presets_stack_each_overriding_the_ones_before(tmp_path):
    """Several leading presets: a later one's setting wins over an earlier one's, the command line over all;
    a list in a later preset replaces an earlier one's."""
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text("models = ['a', 'b']\nrate = 0.5\nsteps = 7\n")
    second.write_text("models = ['c']\nrate = 0.25\n")
    cfg, given = parse_given(Example, [str(first), str(second), "--steps", "9"])
    assert (cfg.models, cfg.rate, cfg.steps) == (["c"], 0.25, 9)
    assert given == {"models", "rate", "steps"}
    assert parse(Example, [str(second), str(first)]).rate == 0.5, "the order decides"
