"""Reading a service's settings once from flags and environment variables, shared by the server
(``SIE_*``) and the bridge (``SIE_BRIDGE_*``).

An option is ``(flag name, parser, help)``; its environment variable is the prefix plus the name
upper-cased with ``_`` for ``-``. A flag wins over its variable. A repeatable option takes the
flag several times, or comma-separated values in its variable, and becomes a tuple. A ``boolean``
option's flag alone means true.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

Option = tuple[str, Callable[[str], Any], str]


def boolean(text: str) -> bool:
    """A yes/no setting: true/1/yes/on or false/0/no/off (any case)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def env_name(prefix: str, name: str) -> str:
    return prefix + name.upper().replace("-", "_")


def build_parser(
    prog: str,
    description: str,
    options: Sequence[Option],
    prefix: str,
    repeatable: Collection[str] = (),
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, kind, help_text in options:
        env = env_name(prefix, name)
        if name in repeatable:
            parser.add_argument(
                f"--{name}",
                type=kind,
                action="append",
                help=f"{help_text} [{env}, comma separated]",
            )
        elif kind is boolean:
            parser.add_argument(
                f"--{name}", type=kind, nargs="?", const=True, help=f"{help_text} [{env}]"
            )
        else:
            parser.add_argument(f"--{name}", type=kind, help=f"{help_text} [{env}]")
    return parser


def read_options(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
    options: Sequence[Option],
    prefix: str,
    repeatable: Collection[str] = (),
) -> dict[str, Any]:
    """The values given by flag or environment, by attribute name (options given neither are
    left out: the settings' defaults apply). A variable that does not parse exits with one line."""
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for name, kind, _ in options:
        attr = name.replace("-", "_")
        flag = args.get(attr)
        variable = env_name(prefix, name)
        raw = environ.get(variable)
        if name in repeatable:
            items = flag if flag else [kind(v.strip()) for v in (raw or "").split(",") if v.strip()]
            if items:
                values[attr] = tuple(items)
        elif flag is not None:
            values[attr] = flag
        elif raw is not None:
            try:
                values[attr] = kind(raw)
            except ValueError:
                kind_name = getattr(kind, "__name__", "value")
                raise SystemExit(f"{variable}={raw!r} is not a valid {kind_name}") from None
    return values
