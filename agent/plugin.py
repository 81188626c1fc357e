"""The plugin API: everything a metal-agent plugin imports, from this one module.

A plugin, the built-in ones in ``plugins/`` included, imports nothing else from ``agent``: the modules behind
these names are the agent's own and may move or change, these names stay. docs/plugins.md is the guide, with a
complete example package; agent/hookspecs.py documents each hook's arguments and answer.

- Hooks: mark implementations with ``hookimpl``; register the module through the ``ENTRY_POINT_GROUP`` entry
  point group.
- Executors: an ``Executor`` says which units it serves and how to start their server (a ``Launch``).
- What a hook receives: the ``ServingUnit`` (an InferenceService, ``ServiceSpec``, with its Model, ``ModelSpec``,
  and the ``ServeSettings`` the memory check uses), the ``HostMemory`` and the unit's ``Budget``.
- What pre-flight answers: a ``Verdict`` with its ``Reason``, made by ``check_gguf`` (the agent's own check of
  a GGUF file), ``judge`` (for a ``ModelShape`` the plugin read itself) or ``failed`` (the check could not run);
  ``Mode`` is enforce or warn.
- A plugin's own settings: ``Setting`` rows of a ``Kind`` (``BOOLEAN``, ``PATH``, ``integer(...)``, ...), which
  raise ``InvalidValue`` for a bad value; ``format_bytes`` and ``parse_quantity`` read and write sizes.
- Handling user input: ``quoted`` and ``shown`` quote it (bounded) in messages; ``read_bytes`` reads a file
  without blocking on a FIFO or a device, capped in size.
"""

from __future__ import annotations

from agent.budget import Budget
from agent.hookspecs import ENTRY_POINT_GROUP, Executor, Launch, hookimpl
from agent.hostmem import HostMemory
from agent.manifest import ModelSpec, ServiceSpec
from agent.preflight import Mode, Reason, Verdict, failed, judge
from agent.preflight import preflight as check_gguf
from agent.quantity import InvalidValue, format_bytes, parse_quantity, shown
from agent.redact import quoted
from agent.safe_files import read_bytes
from agent.settings import (
    BOOLEAN,
    FRACTION,
    HOST,
    PATH,
    PORT,
    QUANTITY,
    Kind,
    Setting,
    integer,
    seconds,
    string_list,
    text,
    text_choice,
)
from agent.shape import ModelShape, ServeSettings
from agent.units import ServingUnit

__all__ = [
    "BOOLEAN",
    "ENTRY_POINT_GROUP",
    "FRACTION",
    "HOST",
    "PATH",
    "PORT",
    "QUANTITY",
    "Budget",
    "Executor",
    "HostMemory",
    "InvalidValue",
    "Kind",
    "Launch",
    "Mode",
    "ModelShape",
    "ModelSpec",
    "Reason",
    "ServeSettings",
    "ServiceSpec",
    "ServingUnit",
    "Setting",
    "Verdict",
    "check_gguf",
    "failed",
    "format_bytes",
    "hookimpl",
    "integer",
    "judge",
    "parse_quantity",
    "quoted",
    "read_bytes",
    "seconds",
    "shown",
    "string_list",
    "text",
    "text_choice",
]
