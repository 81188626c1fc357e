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
- Measuring a server: ``measure_process`` (host memory, llama.cpp's buffer report) gives a ``Footprint``; on
  NVIDIA GPUs ``list_gpus``, ``gpu_process_memory`` and the learned ``CONTEXT_OVERHEAD`` per GPU, and
  ``gpu_estimate`` (an estimator for ``check_gguf`` that splits device and host memory).
- Handling user input: ``quoted`` and ``shown`` quote it (bounded) in messages; ``read_bytes`` reads a file
  without blocking on a FIFO or a device, capped in size.
"""

from __future__ import annotations

from agent.config.settings import (
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
from agent.estimate.budget import Budget
from agent.estimate.device_estimate import gpu_estimate
from agent.estimate.hostmem import HostMemory
from agent.estimate.preflight import Mode, Reason, Verdict, failed, judge
from agent.estimate.preflight import preflight as check_gguf
from agent.estimate.shape import ModelShape, ServeSettings
from agent.hookspecs import ENTRY_POINT_GROUP, Executor, Launch, hookimpl
from agent.memory.footprint import Footprint, is_device_backend, measure_process
from agent.memory.gpus import CONTEXT_OVERHEAD, DEFAULT_CONTEXT_OVERHEAD, GPU, NoGPU, list_gpus
from agent.memory.gpus import process_memory as gpu_process_memory
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.units import ServingUnit
from agent.util.quantity import InvalidValue, format_bytes, parse_quantity, shown
from agent.util.redact import quoted
from agent.util.safe_files import read_bytes

__all__ = [
    "BOOLEAN",
    "CONTEXT_OVERHEAD",
    "DEFAULT_CONTEXT_OVERHEAD",
    "ENTRY_POINT_GROUP",
    "FRACTION",
    "GPU",
    "HOST",
    "PATH",
    "PORT",
    "QUANTITY",
    "Budget",
    "Executor",
    "Footprint",
    "HostMemory",
    "InvalidValue",
    "Kind",
    "Launch",
    "Mode",
    "ModelShape",
    "ModelSpec",
    "NoGPU",
    "Reason",
    "ServeSettings",
    "ServiceSpec",
    "ServingUnit",
    "Setting",
    "Verdict",
    "check_gguf",
    "failed",
    "format_bytes",
    "gpu_estimate",
    "gpu_process_memory",
    "hookimpl",
    "integer",
    "is_device_backend",
    "judge",
    "list_gpus",
    "measure_process",
    "parse_quantity",
    "quoted",
    "read_bytes",
    "seconds",
    "shown",
    "string_list",
    "text",
    "text_choice",
]
