"""The effective configuration: defaults < TOML file < ``METAL_AGENT_*`` environment < flags.

Every source is checked, not only the one that wins: a typo in the file is an error even when a flag overrides
that key, because a typo that hides today bites when the flag is dropped. Errors are one line that names the
file (or variable, or flag), the key and, for a likely typo, the key that was probably meant.

The file is ``--config PATH``, else ``$METAL_AGENT_CONFIG``, else ``$XDG_CONFIG_HOME/metal-agent/config.toml``
(``~/.config/metal-agent/config.toml`` without XDG_CONFIG_HOME); only an explicitly named file must exist.
Relative paths in the file are taken relative to the file's directory.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config.settings import BOOLEAN, ENV_PREFIX, SETTINGS, Setting, toml_value
from agent.processes import marker
from agent.util.quantity import InvalidValue
from agent.util.safe_files import read_text

if TYPE_CHECKING:
    from agent.engine.plugin_manager import Plugins

CONFIG_ENV = ENV_PREFIX + "CONFIG"
PLUGIN_AUTOLOAD_ENV = ENV_PREFIX + "DISABLE_PLUGIN_AUTOLOAD"  # set: only the built-in plugins load
# METAL_AGENT_* variables that are not settings: the config file, the plugin switch, the marks servers carry
NOT_SETTINGS = frozenset({CONFIG_ENV, PLUGIN_AUTOLOAD_ENV, *marker.NAMES})
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few kilobytes; a FIFO or a device is refused (agent/util/safe_files.py)
PRECEDENCE = "flag > METAL_AGENT_* environment variable > config file > default"


class ConfigError(ValueError):
    """Invalid configuration: one line naming where (file, variable or flag) and which key."""


def default_path(env: Mapping[str, str] = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "metal-agent" / "config.toml"


@dataclass(frozen=True)
class Entry:
    setting: Setting
    value: Any
    source: str  # default | file | env | flag
    origin: str  # "default", the file's path, the variable's name or the flag


@dataclass(frozen=True)
class Config:
    file: Path | None  # the file that was read, None when there was none
    entries: dict[str, Entry]

    def __getitem__(self, name: str) -> Any:
        return self.entries[name].value

    def values(self) -> dict[str, Any]:
        return {name: entry.value for name, entry in self.entries.items()}

    def where(self, name: str) -> str:
        """Where a setting's value came from, as an error message names it."""
        entry = self.entries[name]
        s = entry.setting
        return {"file": f"{entry.origin}: {s.dotted}", "env": s.env, "flag": s.flag_name}.get(
            entry.source, f"{s.dotted} (default)"
        )

    def fields(self, names: Iterable[str]) -> dict[str, Any]:
        """Keyword arguments for a dataclass (``AgentConfig``) that has some of these settings as fields."""
        wanted = set(names)
        return {e.setting.config_field: e.value for e in self.entries.values() if e.setting.config_field in wanted}


def all_settings(plugins: Plugins | None = None) -> list[Setting]:
    """The agent's settings and those the plugins declare (checked when they load: a plugin whose setting names
    are taken fails alone). Third-party settings have no flag: the parsers are built before such plugins load."""
    return [*SETTINGS, *(setting for _, setting in (plugins.declared_settings() if plugins else ()))]


def locate(explicit: Path | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file to read, or None when no file was named and the default location has none."""
    named = explicit.expanduser() if explicit else None
    named = named or (Path(env[CONFIG_ENV]).expanduser() if env.get(CONFIG_ENV) else None)
    if named is not None:
        if not named.is_file():
            where = "--config" if explicit else CONFIG_ENV
            raise ConfigError(f"{where}: {named} is not a file")
        return named
    default = default_path(env)
    return default if default.is_file() else None


def read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(read_text(path, MAX_CONFIG_BYTES))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def file_values(document: Mapping[str, Any], path: Path, settings: Sequence[Setting]) -> dict[str, Any]:
    """The file's raw values by setting name; unknown tables and keys are errors with a suggestion."""
    by_place = {(s.section, s.key): s for s in settings}
    sections = {s.section for s in settings}
    found: dict[str, Any] = {}

    def unknown(what: str, dotted: str, key: str, likely: Iterable[str]) -> ConfigError:
        """A close match among ``likely``, else the same key in another table (``[api] fraction``)."""
        elsewhere = [s.dotted for s in settings if s.key == key]
        hint = _did_you_mean(dotted, likely) or (f" (did you mean {elsewhere[0]}?)" if elsewhere else "")
        return ConfigError(f"{path}: unknown {what} {dotted}{hint}")

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if prefix in sections:
                setting = by_place.get((prefix, key))
                if setting is None:
                    raise unknown("key", dotted, key, [s.dotted for s in settings if s.section == prefix])
                found[setting.name] = value
            elif isinstance(value, dict) and (dotted in sections or any(s.startswith(dotted + ".") for s in sections)):
                walk(value, dotted)  # a table that is, or leads to, a known section: [executors] -> [executors.x]
            else:
                what = "table" if isinstance(value, dict) else "key"
                raise unknown(what, dotted, key, sections | {s.dotted for s in settings})

    walk(document, "")
    return found


def _beside(file: Path, raw: Any) -> Any:
    """A relative path in a config file is taken relative to the file; anything else is left to the kind."""
    if isinstance(raw, str) and raw and not Path(raw).expanduser().is_absolute():
        return str(file.parent / raw)
    return raw


def env_values(env: Mapping[str, str], settings: Sequence[Setting]) -> dict[str, str]:
    """``METAL_AGENT_*`` variables by setting name; an empty variable counts as unset, an unknown one is an error."""
    by_env = {s.env: s for s in settings}
    found: dict[str, str] = {}
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS or not text:
            continue
        setting = by_env.get(name)
        if setting is None:
            raise ConfigError(f"{name}: not a metal-agent setting{_did_you_mean(name, by_env)}")
        found[setting.name] = text
    return found


def resolve(
    settings: Sequence[Setting],
    file: Path | None = None,
    env: Mapping[str, str] = os.environ,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Every setting's value and where it came from. ``flags`` maps setting names to given flag values."""
    document = read_file(file) if file else {}
    from_file = file_values(document, file, settings) if file else {}
    from_env = env_values(env, settings)
    entries: dict[str, Entry] = {}
    try:
        for s in settings:
            value = None if s.default is None else s.kind.check(s.default, f"default of {s.dotted}")
            entry = Entry(s, value, "default", "default")
            if s.name in from_file:
                assert file is not None
                raw = from_file[s.name]
                if s.kind.is_path:  # relative to the file, before the kind checks the path
                    raw = [_beside(file, r) for r in raw] if isinstance(raw, list) else _beside(file, raw)
                entry = Entry(s, s.kind.check(raw, f"{file}: {s.dotted}"), "file", str(file))
            if s.name in from_env:
                entry = Entry(s, s.kind.check(s.kind.from_text(from_env[s.name], s.env), s.env), "env", s.env)
            given = (flags or {}).get(s.name)
            if given is not None:
                text_or_value = s.kind.from_text(given, s.flag_name) if isinstance(given, str) else given
                entry = Entry(s, s.kind.check(text_or_value, s.flag_name), "flag", s.flag_name)
            entries[s.name] = entry
    except InvalidValue as exc:
        raise ConfigError(str(exc)) from None
    return Config(file, entries)


def load(args: argparse.Namespace, settings: Sequence[Setting], env: Mapping[str, str] = os.environ) -> Config:
    """The configuration for a command whose parser has ``add_config_flag`` and ``add_setting_flags``."""
    file = locate(getattr(args, "config", None), env)
    flags = {s.name: getattr(args, s.name, None) for s in settings}
    return resolve(settings, file, env, flags)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML config file (default: ${CONFIG_ENV}, else {_display(default_path())} if it exists)",
    )


def _display(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if text.startswith(home + os.sep) else text


def add_setting_flags(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """A flag per setting (plugins' settings from entry points have none); every default is None: not given."""
    group = parser.add_argument_group(f"settings ({PRECEDENCE})")
    for s in settings:
        if not s.flag:
            continue
        default = "unset" if s.default is None else toml_value(s.default)
        text = f"{s.help} [{s.dotted}, ${s.env}; default {default}]".replace("%", "%%")
        if s.kind.repeatable:
            group.add_argument(s.flag_name, dest=s.name, metavar=s.kind.metavar, action="append", help=text)
        elif s.kind is BOOLEAN:
            group.add_argument(s.flag_name, dest=s.name, action=argparse.BooleanOptionalAction, help=text)
        else:
            choices = s.kind.choices or None
            group.add_argument(
                s.flag_name, dest=s.name, metavar=None if choices else s.kind.metavar, choices=choices, help=text
            )
