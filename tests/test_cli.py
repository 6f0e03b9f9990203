"""cli.parse: flags generated from a config dataclass."""

from dataclasses import dataclass

import pytest

from cli import option, parse


@dataclass
class Example:
    models: list[str] = option("repeatable and required")
    lr: float = option("a float", default=1e-6, group="grpo")
    steps: int = option("an int", default=3)
    limit: int | None = option("an optional int", default=None)
    mode: str = option("one of two", choices=("paper", "code"), default="paper")
    quiet: bool = option("a switch", default=False)
    fresh: list[str] = option("a default from a factory", default_factory=lambda: ["x"])


def test_types_defaults_and_repeats():
    cfg = parse(Example, ["--models", "a", "--models", "b", "--lr", "0.5", "--limit", "7", "--quiet"])
    assert cfg == Example(models=["a", "b"], lr=0.5, steps=3, limit=7, mode="paper", quiet=True, fresh=["x"])
    assert isinstance(cfg.lr, float) and isinstance(cfg.limit, int)
    assert parse(Example, ["--models", "a", "--no-quiet", "--mode", "code"]).mode == "code"


@pytest.mark.parametrize("argv", [[], ["--models", "a", "--mode", "other"], ["--models", "a", "--steps", "x"]])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(Example, argv)
    assert stop.value.code == 2 and "usage:" in capsys.readouterr().err


def test_help_shows_groups_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(Example, ["--help"])
    text = capsys.readouterr().out
    assert "grpo:" in text and "(default: 1e-06)" in text and "{paper,code}" in text
