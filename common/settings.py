"""Settings declared once, on a dataclass field, and derived from there everywhere else.

A config dataclass declares each setting as ``name: type = setting(default, "help", ...)``: the
field name is the config-file key and the argparse dest, the annotation gives the flag's type, the
default is the default. From that one declaration:

- `SettingsParser.add_settings` generates the argparse flags (``--page-size``; a bool defaulting
  to False is a switch ``--kvstore``; one defaulting to True is switched off by its flag, e.g.
  ``--no-prefix-cache``); help texts end with the default, so ``--help`` shows what the code uses;
- `SettingsParser.parse_args_with_config` reads ``--config FILE`` (JSON or TOML, keys = flag
  names with dashes or underscores, or field names) under the command line: flags given win;
- `from_namespace` builds the dataclass back from parsed flags;
- `to_argv` writes a dataclass as the command line that parses back to it (the launcher starts
  its children this way), naming only the values that differ from the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Section",
    "Setting",
    "SettingsParser",
    "format_bytes",
    "from_namespace",
    "load_config_file",
    "parse_bytes",
    "parse_memory_size",
    "setting",
    "settings_of",
    "to_argv",
]

T = TypeVar("T")

_META = "xllm.setting"  # key of a field's metadata that makes it a setting


def setting(default: Any = None, help: str = "", *, flag: str | None = None, choices: Sequence[Any] | None = None,
            parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
            required: bool = False) -> Any:
    """A dataclass field that is also a flag and a config-file key.

    ``flag`` overrides the flag name (default ``--field-name``; it must be given for a bool that
    defaults to True, whose flag turns it off). ``parse`` turns the flag's text into the value
    (default: from the annotation); ``show`` writes a default for ``--help`` (default: ``str``).
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
            "parse": parse, "show": show, "required": required}
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of a config dataclass, resolved: what argparse and config files need of it."""

    name: str
    flag: str
    default: Any
    help: str
    # "value" (takes an argument), "switch_on" / "switch_off" (a bool flag that sets True /
    # False) or "repeat" (a list, one item per use of the flag).
    kind: str
    parse: Callable[[str], Any]
    choices: tuple[Any, ...] | None
    required: bool
    show: Callable[[Any], str]

    def help_text(self, default: Any) -> str:
        """The help with the default appended: it is the code's default, so it cannot drift."""
        if self.kind in ("switch_on", "switch_off") or default is None or default is argparse.SUPPRESS:
            return self.help
        shown = self.show(default).replace("%", "%%")  # argparse %-formats help strings
        return f"{self.help} (default: {shown})" if self.help else f"(default: {shown})"

    def convert(self, value: Any) -> Any:
        """A flag's text or a config file's value as this setting's type."""
        if self.kind == "repeat" and value is not None:
            return [self.convert_one(item) for item in (value if isinstance(value, list) else [value])]
        return self.convert_one(value)

    def convert_one(self, value: Any) -> Any:
        if value is None or isinstance(value, (list, dict, bool)) or self.parse is str:
            return value  # config files carry lists, bools and numbers-for-strings as they are
        return self.parse(value if isinstance(value, str) else str(value))


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _key(text: str) -> str:
    """Config keys and flags compare without leading dashes and with dashes as underscores."""
    return str(text).lstrip("-").replace("-", "_")


def _union_args(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _resolve(cls: type, fld: dataclasses.Field, hint: Any) -> Setting:
    meta = fld.metadata[_META]
    args = _union_args(hint)
    where = f"{cls.__name__}.{fld.name}"
    kind, parse = "value", meta["parse"]
    if args == (bool,):
        kind = "switch_off" if fld.default else "switch_on"
        if kind == "switch_off" and not meta["flag"]:
            raise TypeError(f"{where}: a bool that defaults to True needs the flag that turns it off")
    elif len(args) == 1 and typing.get_origin(args[0]) is list:
        kind, parse = "repeat", parse or typing.get_args(args[0])[0]
    elif parse is None:
        if str in args:
            parse = str  # e.g. `str | int`: the consumer reads either spelling
        elif len(args) == 1 and args[0] in (int, float):
            parse = args[0]
        else:
            raise TypeError(f"{where}: no flag type for {hint!r}; give setting(parse=...)")
    return Setting(
        name=fld.name, flag=meta["flag"] or _flag_name(fld.name), default=fld.default, help=meta["help"],
        kind=kind, parse=parse or bool, choices=meta["choices"], required=meta["required"],
        show=meta["show"] or str,
    )


_CACHE: dict[type, tuple[Setting, ...]] = {}


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings of a config dataclass, in field order (fields without `setting()` are not)."""
    if cls not in _CACHE:
        hints = typing.get_type_hints(cls)
        _CACHE[cls] = tuple(_resolve(cls, f, hints[f.name]) for f in dataclasses.fields(cls) if _META in f.metadata)
    return _CACHE[cls]


@dataclasses.dataclass(frozen=True)
class Section:
    """Some settings of one config dataclass on one command line: which, and under which flags.

    A command that exposes another program's settings (``xllm serve`` exposes the scheduler's
    ``--pd-policy``, the kvstore's ``--dram-bytes`` as ``--kvstore-dram``) adds a Section and reads
    the same Section back, so the names, types, defaults and help are the program's own.
    """

    cls: type
    title: str | None = None
    only: tuple[str, ...] | None = None
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)  # field -> flag, when renamed

    def entries(self) -> list[tuple[Setting, str, str]]:
        """(setting, flag, dest) of every setting in this section."""
        out = []
        for s in settings_of(self.cls):
            if self.only is not None and s.name not in self.only:
                continue
            flag = self.flags.get(s.name, s.flag)
            out.append((s, flag, s.name if flag == s.flag else _key(flag)))
        return out

    def from_namespace(self, ns: argparse.Namespace | Any, **overrides: Any) -> Any:
        """The dataclass from parsed flags; settings outside the section keep their defaults."""
        values = {s.name: getattr(ns, dest) for s, _, dest in self.entries() if hasattr(ns, dest)}
        values.update(overrides)
        return self.cls(**values)


def from_namespace(cls: type[T], ns: argparse.Namespace | Any, **overrides: Any) -> T:
    """Every setting of ``cls`` from parsed flags (those absent keep their defaults)."""
    return Section(cls).from_namespace(ns, **overrides)


def to_argv(config: Any, base: Any = None) -> list[str]:
    """The flags that make ``config``'s parser produce ``config``: the values that differ from
    ``base`` (default: the dataclass's defaults), each under its own flag."""
    reference = base if base is not None else type(config)()
    argv: list[str] = []
    for s in settings_of(type(config)):
        value = getattr(config, s.name)
        if value == getattr(reference, s.name):
            continue
        if s.kind in ("switch_on", "switch_off"):
            if bool(value) != (s.kind == "switch_on"):
                raise ValueError(f"{s.flag} can only switch {s.name} to {s.kind == 'switch_on'}")
            argv.append(s.flag)
        elif value is None:
            raise ValueError(f"{s.name} cannot be set back to None on a command line")
        else:
            for item in value if s.kind == "repeat" else [value]:
                text = str(item)
                # `--flag=-x`: a value that starts with a dash would read as a flag of its own.
                argv += [f"{s.flag}={text}"] if text.startswith("-") else [s.flag, text]
    return argv


@dataclasses.dataclass
class _Entry:
    setting: Setting
    dest: str
    flag: str
    action: argparse.Action


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser that remembers the settings it was given, so that a config file's keys
    map onto them and required settings may come from the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._entries: dict[str, _Entry] = {}  # config key (dest or flag name) -> entry
        self._groups: dict[str, Any] = {}  # title -> argparse argument group
        self._config_option = False

    def group(self, title: str | None) -> Any:
        """The help group of this title (one per title, however many sections go into it)."""
        if title is None:
            return self
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title)
        return self._groups[title]

    def add_settings(self, cls: type, title: str | None = None, *, only: Iterable[str] | None = None,
                     flags: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> None:
        """Flags for the settings of ``cls`` (all, or ``only`` these, under renamed ``flags``);
        ``defaults`` replaces a default for this command line (argparse.SUPPRESS: none)."""
        self.add_section(Section(cls, title, tuple(only) if only is not None else None, dict(flags or {})),
                         defaults)

    def add_section(self, section: Section, defaults: Mapping[str, Any] | None = None) -> None:
        group = self.group(section.title)
        for s, flag, dest in section.entries():
            default = (defaults or {}).get(s.name, s.default)
            kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": s.help_text(default)}
            if s.kind == "switch_on":
                kwargs["action"] = "store_true"
            elif s.kind == "switch_off":
                kwargs["action"] = "store_false"
            else:
                kwargs.update(type=s.parse, required=s.required)
                if s.kind == "repeat":
                    kwargs["action"] = "append"
                if s.choices is not None:
                    kwargs["choices"] = s.choices
            entry = _Entry(s, dest, flag, group.add_argument(flag, **kwargs))
            for key in (dest, _key(flag)):
                self._entries[key] = entry

    def add_config_option(self, title: str | None = None) -> None:
        """``--config FILE``: read by `parse_args_with_config`, so it is no setting itself."""
        self.group(title).add_argument("--config", default=None, metavar="FILE",
                                       help="JSON or TOML file with the same keys as the flags (flags win)")
        self._config_option = True

    def settings(self) -> list[tuple[Setting, str, str]]:
        """(setting, flag, dest) of every setting this parser holds, in the order added."""
        seen: dict[int, tuple[Setting, str, str]] = {}
        for entry in self._entries.values():
            seen.setdefault(id(entry), (entry.setting, entry.flag, entry.dest))
        return list(seen.values())

    def config_defaults(self, config: Mapping[str, Any], source: str) -> dict[str, Any]:
        """A config file's values as parser defaults (dest -> value); ValueError names a bad key."""
        defaults: dict[str, Any] = {}
        for key, value in config.items():
            norm = _key(key)
            entry = self._entries.get(norm)
            if entry is None:
                raise ValueError(f"{source}: unknown setting {key!r}")
            s = entry.setting
            if s.kind in ("switch_on", "switch_off"):
                if not isinstance(value, bool):
                    raise ValueError(f"{source}: setting {key!r} must be true or false")
                if norm == entry.dest:
                    defaults[entry.dest] = value  # the field itself, e.g. enable_prefix_cache = false
                elif value:
                    defaults[entry.dest] = s.kind == "switch_on"  # the flag, e.g. no_prefix_cache = true
                continue
            try:
                value = s.convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(f"{source}: setting {key!r}: {exc}") from exc
            if s.choices is not None and value is not None and value not in s.choices:
                raise ValueError(f"{source}: setting {key!r} must be one of {list(s.choices)}")
            defaults[entry.dest] = value
            if value is not None:
                entry.action.required = False  # given by the file: the command line need not
        return defaults

    def parse_args_with_config(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse flags; values from ``--config FILE`` become defaults, so flags given win."""
        if self._config_option:
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--config", default=None)
            known, _ = pre.parse_known_args(argv)
            if known.config:
                try:
                    self.set_defaults(**self.config_defaults(load_config_file(known.config), known.config))
                except ValueError as exc:
                    self.error(str(exc))
        return self.parse_args(argv)


# ------------------------------------------------------------------------------ config files


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (`.json`) or TOML (`.toml`, anything else tried as TOML then JSON) file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read config file {file}: {exc.strerror or exc}") from exc
    suffix = file.suffix.lower()
    parsers = [_parse_json] if suffix == ".json" else [_parse_toml] if suffix == ".toml" else [_parse_toml, _parse_json]
    errors = []
    for parse in parsers:
        try:
            data = parse(raw)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if not isinstance(data, dict):
            raise ValueError(f"config file {file} must hold a table/object at the top level")
        return data
    raise ValueError(f"config file {file} is not valid: {'; '.join(errors)}")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"JSON: {exc}") from exc


def _parse_toml(raw: bytes) -> Any:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"TOML: {exc}") from exc


# ------------------------------------------------------------------------------------ sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
# SI suffixes are powers of 1000 and IEC suffixes powers of 1024, as in Kubernetes; "B" is optional.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_memory_size(text: str | int) -> int:
    """Bytes in a size like ``"2GiB"``, ``"512MiB"``, ``"1.5G"`` (SI, 1.5e9) or ``"1000000"``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"memory size must be >= 0, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"memory size must be a string or int, got {type(text).__name__}")
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid memory size {text!r}: expected a number with an optional unit "
            "(B, K/KB, M/MB, G/GB, T/TB, KiB, MiB, GiB, TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_bytes(text: str) -> int:
    """`parse_memory_size` as an argparse type: a bad size is a usage error naming the flag."""
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_bytes(n: int) -> str:
    """Bytes in the largest binary unit that divides them: 1073741824 -> `1GiB`."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
