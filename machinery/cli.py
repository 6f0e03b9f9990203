"""Command lines generated from a config dataclass: one source of truth per script.

Each script (selfplay.py, evaluate.py, bench.py) keeps every setting in one dataclass. A field
declared with `option(help, ...)` becomes the flag --field-name, with its type, its choices, its
group in --help, and its default shown there; `parse` returns the dataclass, and the script saves
`dataclasses.asdict` of it with its results. Flags the user does not give never reach the
dataclass, so its defaults (default_factory included) are the only ones. A field may say which
values make sense (`valid`, one of the ranges below): any other stops the script at once with a
one-line error naming the flag, rather than deep inside a run. Every command-line mistake is that
one line and exit code 2, without the usage text (--help shows it). `parse_given` also says which
flags were given, for scripts that must refuse some of them whatever their value (a resumed run).

A preset is a small TOML file of settings, `name = value` per line, given as the first argument:
`python selfplay.py presets/first_run.toml --seed 1`. Its settings are read as the flags that say
the same, placed before the command line's, so they go through the same checks, a flag given after
overrides them (a list flag replaces the preset's list), and they count as given. Its paths are
relative to where the command runs, as a flag's are. Several presets stack, each overriding the ones
before it: `python selfplay.py presets/ablate.toml presets/ablation/no_diversity.toml ...`.

    @dataclass
    class Config:
        lr: float = option("AdamW learning rate", default=1e-6, group="grpo", valid=POSITIVE)
        model: list[str] = option("repeat for several")           # required: no default
    cfg = parse(Config, argv, "what the script does")
"""

import argparse
import dataclasses
import math
import re
import sys
import tomllib
import types
import typing

from tqdm import tqdm


# Ranges for `option(valid=...)`: (test, what the error says the value must be).
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_2 = (lambda v: v >= 2, "at least 2")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "0 or more, and finite")
POSITIVE = (lambda v: 0 < v < math.inf, "more than 0, and finite")
PROBABILITY = (lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")


def option(help, group=None, choices=None, valid=None, **kw):
    """A dataclass field that is also a flag; kw: default or default_factory (neither: required);
    valid: a range above, checked on the command line."""
    return dataclasses.field(metadata={"help": help, "group": group, "choices": choices, "valid": valid}, **kw)


def _checked(kind, valid):
    """argparse's `type`: text -> kind, refused (with the flag's name, by argparse) out of range."""
    if valid is None:
        return kind
    test, what = valid

    def convert(text):
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return value
    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return convert


def _argument(kind, help, choices, valid):
    """argparse keywords for a field of type `kind`."""
    if kind is bool:
        return dict(action=argparse.BooleanOptionalAction, help=help)
    if typing.get_origin(kind) is list:  # repeatable: --model a --model b
        return dict(action="append", type=_checked(typing.get_args(kind)[0], valid), help=help, choices=choices)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # int | None: an int, or left out
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return dict(type=_checked(kind, valid), help=help, choices=choices)


# A negative number in any notation float() reads: -1e-5, -.5, -5., -inf. argparse's own pattern knows
# only -5 and -0.5 and takes the rest for a flag ("--lr: expected one argument"), so the value never
# reached the flag's range check.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    def __init__(self, hint=" (see --help)", **kw):
        super().__init__(**kw)
        self.hint = hint
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's (private) pattern for negative numbers

    def error(self, message):
        # One line: the 40 lines of usage argparse prints first would bury it.
        self.exit(2, f"{self.prog}: error: {message}{self.hint}\n")


def parse(config_class, argv=None, description=None):
    """argv (list[str]; None = sys.argv[1:]) -> an instance of config_class."""
    return parse_given(config_class, argv, description)[0]


def settings_flags(parser, config_class, settings, source, later=()):
    """The flags that say what `settings` ({name: value}, from the file `source`) say. later: the
    command line after them, whose flags of a list (evaluate's --model) replace the settings' list."""
    hints = typing.get_type_hints(config_class)
    flags = []
    for name, value in settings.items():
        if name not in hints:
            parser.error(f"'{source}' sets '{name}', which is not a setting of this command")
        flag, kind = "--" + name.replace("_", "-"), hints[name]
        if kind is bool:
            if not isinstance(value, bool):
                parser.error(f"'{source}' sets {name} = {value!r}: true or false")
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, bool)) or (isinstance(value, list) and typing.get_origin(kind) is not list):
            parser.error(f"'{source}' sets {name} = {value!r}: one {getattr(kind, '__name__', kind)}")
        elif value is not None and not (isinstance(value, list) and any(a == flag or a.startswith(flag + "=")
                                                                         for a in later)):
            flags += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
    return flags


def read_preset(path):
    """The settings {name: value} of the preset file `path`; ValueError in one line if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the preset '{path}': {err}") from None


def preset_flags(parser, config_class, path, later=()):
    """The flags that say what the preset file `path` says (see the module's docstring)."""
    try:
        settings = read_preset(path)
    except ValueError as err:
        parser.error(str(err))
    return settings_flags(parser, config_class, settings, path, later)


def _parser(config_class, description=None, **kw):
    """The argparse parser of config_class's fields (default=SUPPRESS: only the flags given are set)."""
    parser = _Parser(description=description, **kw)
    groups = {}
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        group = meta["group"]
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        help = meta["help"] if default in (None, "", False) else f"{meta['help']} (default: {default})"
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required,
                            default=argparse.SUPPRESS, **_argument(hints[f.name], help, meta["choices"], meta["valid"]))
    return parser


def parse_given(config_class, argv=None, description=None):
    """argv (list[str]; None = sys.argv[1:]), which may start with preset files (*.toml) -> (an
    instance of config_class, the frozenset of the field names given, in the preset or as flags,
    whatever their value: even one equal to the default)."""
    parser = _parser(config_class, description)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    presets = []
    while argv and argv[0].endswith(".toml"):
        presets.append(argv.pop(0))
    for path in reversed(presets):  # each preset's flags before those of the later ones and the command line
        argv = preset_flags(parser, config_class, path, argv) + argv
    given = vars(parser.parse_args(argv))
    return config_class(**given), frozenset(given)


def checked(config_class, settings, source):
    """config_class of the saved settings {name: value} (a run's config.json), through the checks a
    command line gets: a value of the wrong type or out of range exits 2 with one line naming
    `source` and the setting."""
    parser = _parser(config_class, prog=f"cannot resume: '{source}'", hint=" (edit it back, or start a new run)")
    return config_class(**vars(parser.parse_args(settings_flags(parser, config_class, settings, source))))


# -----------------------------------------------------------------------------
# Progress bars that suit a log file

class _Lines:
    """A stream for tqdm that writes each refresh as a line of its own: a log file, unlike a terminal,
    never returns to the start of a line, so redrawn bars would run together into one."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text):
        line = text.strip("\r\n ")
        if line and line != self.last:  # closing a bar redraws its last state once more
            self.stream.write(line + "\n")
            self.last = line

    def flush(self):
        self.stream.flush()


class _LogBar(tqdm):
    """A bar in a log file: a postfix (set_postfix) waits for the bar's next line instead of drawing
    one of its own, and no monitor thread redraws a stale line between two updates."""
    monitor_interval = 0

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def _terminal(stream):
    """Whether stream is a terminal (False for a log file, and for a closed or missing stderr)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(items=None, **kwargs):
    """tqdm on stderr; when stderr is not a terminal, a line at the start, one a minute and one at
    the end; nothing when stderr is closed."""
    if kwargs.get("disable") or _terminal(sys.stderr):
        return tqdm(items, **kwargs)
    if sys.stderr is None or getattr(sys.stderr, "closed", False):
        return tqdm(items, **dict(kwargs, disable=True))
    return _LogBar(items, file=_Lines(sys.stderr), mininterval=60, ascii=True, **kwargs)
