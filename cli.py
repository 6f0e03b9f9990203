"""Command lines generated from a config dataclass: one source of truth per script.

Each script (selfplay.py, evaluate.py, bench.py) keeps every setting in one dataclass. A field
declared with `option(help, ...)` becomes the flag --field-name, with its type, its choices, its
group in --help, and its default shown there; `parse` returns the dataclass, and the script saves
`dataclasses.asdict` of it with its results. Flags the user does not give never reach the
dataclass, so its defaults (default_factory included) are the only ones.

    @dataclass
    class Config:
        lr: float = option("AdamW learning rate", default=1e-6, group="grpo")
        model: list[str] = option("repeat for several")           # required: no default
    cfg = parse(Config, argv, "what the script does")
"""

import argparse
import dataclasses
import types
import typing


def option(help, group=None, choices=None, **kw):
    """A dataclass field that is also a flag; kw: default or default_factory (neither: required)."""
    return dataclasses.field(metadata={"help": help, "group": group, "choices": choices}, **kw)


def _argument(kind, help, choices):
    """argparse keywords for a field of type `kind`."""
    if kind is bool:
        return dict(action=argparse.BooleanOptionalAction, help=help)
    if typing.get_origin(kind) is list:  # repeatable: --model a --model b
        return dict(action="append", type=typing.get_args(kind)[0], help=help, choices=choices)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # int | None: an int, or left out
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return dict(type=kind, help=help, choices=choices)


def parse(config_class, argv=None, description=None):
    """argv (list[str]; None = sys.argv[1:]) -> an instance of config_class."""
    parser = argparse.ArgumentParser(description=description)
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
                            default=argparse.SUPPRESS, **_argument(hints[f.name], help, meta["choices"]))
    return config_class(**vars(parser.parse_args(argv)))
