"""Write docs/plugins.md: the guide, the hook reference from agent/hookspecs.py, the example package verbatim.

The reference is built from the hook specifications' own docstrings and signatures, grouped by pipeline stage,
and the example is the package the tests install and run (tests/example_plugin), so the page cannot drift from
the code: tests/engine/test_plugins.py fails until this script has been run after either changed.
Run: python scripts/plugin_docs.py [--check]
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent import hookspecs, plugin

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "tests" / "example_plugin"

# (title, what happens there, the hooks and classes documented there), in pipeline order.
STAGES = (
    ("Loading", "Once, when the agent (or a command that reads the configuration) starts.",
     ("agent_settings", "register_executors")),
    ("Stage 1: the budget", "Per unit, each time it is started or restarted.", ("resolve_budget",)),
    ("Stage 2: pre-flight", "Before admission and before any download.", ("preflight",)),
    ("Stage 3: spawn", "The first executor that accepts the unit builds its server's command.",
     ("Executor", "Launch")),
    ("Stage 4: reporting", "At every change of a unit's status.", ("report",)),
)  # fmt: skip

GUIDE = """\
# Writing a metal-agent plugin

<!-- Written by scripts/plugin_docs.py from agent/hookspecs.py and tests/example_plugin: edit those. -->

A plugin is a Python module whose functions are marked `@hookimpl`, installed with an entry point in the
`metal_agent.executors` group. Most plugins add an *executor*: something that serves a kind of model (a runtime,
an accelerator, a format) while the agent keeps its memory budget. A plugin can also take settings, replace how
budgets are resolved or models checked, or report statuses elsewhere.

**Import only `agent.plugin`.** It is the public API; every other module of `agent` may change between releases.
It exports: {exports}.

**How plugins are called.** Through [pluggy](https://pluggy.readthedocs.io/): the last registered plugin first,
so installed plugins come before the built-in ones and the agent's own defaults come last; `tryfirst`,
`trylast` and wrappers (`@hookimpl(wrapper=True)`) work. `resolve_budget` and `preflight` take the first answer
that is not None. Any hook may be `async def`: the agent awaits it (an async answer that is None passes the
question on; a wrapper sees an async answer before it is awaited).

**A broken plugin fails alone.** One that cannot be imported, implements a hook no specification names (a
typo: the message suggests the right name), declares a setting that is taken, or raises in `agent_settings` or
`register_executors` is left out, and `metal-agent plugins` lists it with the reason; the agent runs on with
the others. A raising `report` is logged and the other reporters still run. An exception in `resolve_budget`,
`preflight` or an executor's `command` fails that unit with the message.

**Try it.** `pip install ./my-plugin` beside metal-agent, then `metal-agent plugins` lists the plugin, its
executors (in the order they are asked) and its settings, and `metal-agent config sample` shows its settings'
table. `METAL_AGENT_DISABLE_PLUGIN_AUTOLOAD=1` loads only the built-in plugins (the test suite runs that way).

## A complete example

`tests/example_plugin`, which the tests build, install and serve a model with: an executor for
InferenceServices with `runtime: example`, and one setting (`[executors.example] threads`).

`metal_agent_example.py`:

```python
{example}```

`pyproject.toml`:

```toml
{pyproject}```

## Hook reference
"""


def _doc(obj: object) -> str:
    return inspect.getdoc(obj) or ""


def _signature(name: str, function: Callable[..., object]) -> str:
    """``name(arg: type, ...) -> type`` as written in the source (annotations are strings there)."""
    signature = inspect.signature(function)
    params = [
        f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name
        for p in signature.parameters.values()
        if p.name != "self"
    ]
    returns = "" if signature.return_annotation is signature.empty else f" -> {signature.return_annotation}"
    return f"{name}({', '.join(params)}){returns}"


def _default(field: dataclasses.Field[object]) -> str:
    if field.default is not dataclasses.MISSING:
        return f" = {field.default!r}"
    if field.default_factory is not dataclasses.MISSING:
        return f" = {field.default_factory()!r}"
    return ""


def describe(name: str) -> str:
    obj = getattr(hookspecs, name)
    if dataclasses.is_dataclass(obj):
        fields = ", ".join(f"{f.name}: {f.type}{_default(f)}" for f in dataclasses.fields(obj))
        return f"### `{name}({fields})`\n\n{_doc(obj)}\n"
    if inspect.isclass(obj):
        methods = [m for m in ("accepts", "command") if hasattr(obj, m)]
        methods += [m for m in vars(obj) if not m.startswith("_") and callable(vars(obj)[m]) and m not in methods]
        parts = [f"### `{name}` (protocol)\n\n{_doc(obj)}\n"]
        for method in methods:
            text = _signature(method, getattr(obj, method))
            parts.append(f"- `{text}`: {' '.join(_doc(getattr(obj, method)).split())}")
        return "\n".join(parts) + "\n"
    marker = getattr(obj, f"{hookspecs.PROJECT}_spec", {}) or {}
    kind = " (first result)" if marker.get("firstresult") else ""
    return f"### `{_signature(name, obj)}`{kind}\n\n{_doc(obj)}\n"


def specified() -> list[str]:
    """Every hook specification and the executor types, in the order of the module."""
    names = [n for n, o in vars(hookspecs).items() if getattr(o, f"{hookspecs.PROJECT}_spec", None) is not None]
    return ["Executor", "Launch", *names]


def render() -> str:
    exports = ", ".join(f"`{name}`" for name in sorted(plugin.__all__, key=str.lower))
    example = (EXAMPLE / "metal_agent_example.py").read_text()
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    text = GUIDE.format(exports=exports, example=example, pyproject=pyproject)
    placed = {name for _, _, names in STAGES for name in names}
    stages = [*STAGES, ("Other hooks", "", tuple(n for n in specified() if n not in placed))]
    for title, when, names in stages:
        if names:
            text += f"\n### {title}\n\n{when}\n\n" if when else f"\n### {title}\n\n"
            text += "\n".join(describe(name).replace("### ", "#### ", 1) for name in names)
    return text


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/plugin_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
