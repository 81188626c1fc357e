"""``extraArgs``: an allowlist of server flags, matched exactly, never a list of flags to block.

A block list loses to the server's own parser: argparse takes ``--ctx`` for ``--ctx-size`` and ``--ho`` for
``--host``, llama.cpp reads ``--ctx_size`` as ``--ctx-size``, and every release adds flags that read files,
fetch models or allocate memory. So an extra argument passes only when it is, token for token, a flag on the
allowlist (``--flag``, ``--flag=value`` or a documented short form) followed by exactly the values that flag
takes. Each server's flags are catalogued with their spellings, how many values they take and why the ones
outside the allowlist are refused; flags that change memory, what the server listens on or which files it
reads or writes can never be allowed, not even by an operator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from agent.plugin import InvalidValue, Kind, shown, string_list

EXTEND_HINT = "an operator can allow more with extra_args_allowed in the agent's config"


class Use(StrEnum):
    """What a flag does, which decides whether extraArgs may carry it."""

    ALLOWED = "allowed"  # sampling, chat and other options that change neither memory, network nor files
    MEMORY = "memory"
    NETWORK = "network"
    FILES = "files"
    MANAGED = "managed"  # the agent relies on it (the log it reads, the server staying loaded)
    OTHER = "other"  # harmless to the budget but not allowed by default; an operator may allow it

    @property
    def never_allowed(self) -> bool:
        return self in (Use.MEMORY, Use.NETWORK, Use.FILES, Use.MANAGED)

    def why(self) -> str:
        return {
            Use.ALLOWED: "is allowed",
            Use.MEMORY: "changes the server's memory behind its budget",
            Use.NETWORK: "changes where or how the server listens",
            Use.FILES: "makes the server read or write files, or fetch a model, outside what the agent checked",
            Use.MANAGED: "changes what the agent relies on to supervise the server",
            Use.OTHER: "is not allowed by default",
        }[self]


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    values: int  # how many arguments follow the flag
    use: Use
    instead: str = ""  # what to do instead ("set spec.contextSize"), if there is something

    def describe(self, token: str) -> str:
        return f"{shown(token)} {self.reason()}"

    def reason(self) -> str:
        text = self.use.why()
        if self.instead:
            text += f"; {self.instead}"
        elif not self.use.never_allowed:
            text += f" ({EXTEND_HINT})"
        return text


def use_instead(where: str) -> str:
    return f"set {where} instead"


def flags(use: Use, *lines: str, instead: str = "") -> list[Flag]:
    """``flags(Use.MEMORY, "-c --ctx-size N")``: the names of a flag, then one word per value it takes."""
    found = []
    for line in lines:
        words = line.split()
        names = tuple(w for w in words if w.startswith("-"))
        found.append(Flag(names, len(words) - len(names), use, instead))
    return found


@dataclass(frozen=True)
class FlagTable:
    """One server's flags, every spelling it documents."""

    server: str
    setting: str  # the config key that extends its allowlist, for messages
    entries: tuple[Flag, ...]
    by_name: dict[str, Flag] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Flag] = {}
        for flag in self.entries:
            for name in flag.names:
                if name in by_name:
                    raise ValueError(f"{self.server}: {name} is catalogued twice")
                by_name[name] = flag
        object.__setattr__(self, "by_name", by_name)

    def allowlist(self, extra: Iterable[str] = ()) -> Allowlist:
        """The default allowlist plus the operator's entries (already checked by ``check_entries``)."""
        allowed = {name: f.values for f in self.entries if f.use is Use.ALLOWED for name in f.names}
        for entry in extra:
            name, values = self._entry(entry, "extra_args_allowed")
            known = self.by_name.get(name)
            allowed.update(dict.fromkeys(known.names, known.values) if known else {name: values})
        return Allowlist(self, allowed)

    def check_entries(self, items: Sequence[str], where: str) -> tuple[str, ...]:
        """Operator entries (``--flag``, or ``--flag VALUE`` for a flag this table does not know that takes one)."""
        entries = [entry.strip() for item in items for entry in item.split(",") if entry.strip()]
        for entry in entries:
            self._entry(entry, where)
        return tuple(entries)

    def _entry(self, entry: str, where: str) -> tuple[str, int]:
        words = entry.split()
        name, values = words[0], len(words) - 1
        if not name.startswith("-") or name in ("-", "--") or "=" in name or values > 1:
            raise InvalidValue(
                f"{where}: {shown(entry)} is not a flag (write --flag, or --flag VALUE for an unknown flag that "
                "takes a value)"
            )
        spelled = _canonical(name)
        known = self.by_name.get(name) or self.by_name.get(spelled)
        if known is None and (abbreviated := self.abbreviates(name)):
            known = next(iter(abbreviated.values()))
        if known is not None and known.use.never_allowed:
            label = name if name in known.names[-1:] else f"{name} ({known.names[-1]})"
            raise InvalidValue(
                f"{where}: {label} {known.reason()}; flags that change memory, the network, "
                f"files or what the agent relies on cannot be allowed for {self.server}"
            )
        if known is not None and name not in known.names:
            raise InvalidValue(f"{where}: {shown(name)} is not how {self.server} spells it; write {known.names[-1]}")
        if known is not None and values and known.values == 0:
            raise InvalidValue(f"{where}: {name} takes no value")
        return name, known.values if known else values

    def abbreviates(self, name: str) -> dict[str, Flag]:
        """The refused flags ``name`` abbreviates, by the spelling it abbreviates (argparse takes a unique prefix)."""
        if not name.startswith("--"):
            return {}
        found: dict[str, Flag] = {}
        for known, flag in self.by_name.items():
            if known.startswith(name) and flag.use.never_allowed and flag not in found.values():
                found[known] = flag
        return found


def _canonical(name: str) -> str:
    """llama.cpp reads ``--ctx_size`` as ``--ctx-size``: compare flags the way it does."""
    return name.replace("_", "-") if name.startswith("--") else name


class ExtraArgsRefused(ValueError):
    """An extra argument outside the allowlist: the unit's spec is invalid, nothing is started."""


@dataclass(frozen=True)
class Allowlist:
    table: FlagTable
    allowed: dict[str, int]  # exact flag token -> how many values follow it

    def check(self, args: Sequence[str]) -> list[str]:
        """The arguments as they will be passed (``--flag=value`` split in two); raises ``ExtraArgsRefused``."""
        out: list[str] = []
        index = 0
        while index < len(args):
            token = args[index]
            name, joined, value = token.partition("=") if token.startswith("-") else (token, "", "")
            values = self.allowed.get(name)
            if values is None:
                raise ExtraArgsRefused(f"extraArgs: {self._refusal(name)}")
            if joined and values != 1:
                raise ExtraArgsRefused(f"extraArgs: {shown(token)}: {name} takes {_count(values)}, not one")
            given = [value] if joined else list(args[index + 1 : index + 1 + values])
            if len(given) < values:
                raise ExtraArgsRefused(f"extraArgs: {name} needs {_count(values)} after it")
            out += [name, *given]
            index += 1 if joined else 1 + values
        return out

    def problem(self, args: Sequence[str]) -> str | None:
        try:
            self.check(args)
        except ExtraArgsRefused as exc:
            return str(exc)
        return None

    def _refusal(self, name: str) -> str:
        known = self.table.by_name.get(name)
        if known is not None:
            return known.describe(name)
        server = self.table.server
        if not name.startswith("-") or name in ("-", "--"):
            return f"{shown(name)} is not a {server} flag (a value with no flag before it that takes one?)"
        spelled = _canonical(name)
        if spelled in self.allowed:
            return f"{shown(name)} is not spelled as {server} documents it; write {spelled}"
        if spelled in self.table.by_name:
            return self.table.by_name[spelled].describe(name) + f" (it is {spelled} spelled differently)"
        abbreviated = self.table.abbreviates(name)
        if len(abbreviated) == 1:
            (full, flag), *_ = abbreviated.items()
            return f"{shown(name)} abbreviates {full}, which {flag.reason()}"
        if abbreviated:
            names = sorted(abbreviated, key=len)
            listed = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
            return (
                f"{shown(name)} is not a {server} flag: flags must be spelled in full (it abbreviates {listed}, "
                "which change memory, the network or files)"
            )
        return (
            f"{shown(name)} is not a {server} flag metal-agent allows: flags must be spelled in full as {server} "
            f"documents them (no abbreviations); {EXTEND_HINT} ({self.table.setting})"
        )


def _count(values: int) -> str:
    return {0: "no value", 1: "one value"}.get(values, f"{values} values")


def allowlist_kind(table: FlagTable) -> Kind:
    """The ``extra_args_allowed`` setting's type: operator entries, refused at load when they may never be allowed."""
    return string_list(table.check_entries, "list of flags", "FLAG")
