"""The GGUF format's constants (value types, quantization block sizes, metadata key names) without numpy.

They come from the ``gguf`` package, the format's reference, whose ``constants`` module is plain Python. But
``import gguf`` runs the package's ``__init__``, which imports its reader, writer and numpy: about 0.2 s of CPU,
more than reading a header takes, paid by every ``metal-agent estimate``. So the constants module is loaded on
its own, from the installed package's file, under a private name. Where the package is imported already, or the
file cannot be loaded on its own (a future layout), the package's own module is used: same values either way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

__all__ = ["gguf"]
_PRIVATE_NAME = "agent._gguf_constants"


def _load() -> Any:
    loaded = sys.modules.get("gguf.constants") or sys.modules.get(_PRIVATE_NAME)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("gguf")  # finds the package without importing it
    if package is not None and package.submodule_search_locations:
        path = Path(next(iter(package.submodule_search_locations))) / "constants.py"
        spec = importlib.util.spec_from_file_location(_PRIVATE_NAME, path)
        if spec is not None and spec.loader is not None and path.is_file():
            module = importlib.util.module_from_spec(spec)
            sys.modules[_PRIVATE_NAME] = module  # enums and dataclasses look their module up while being built
            try:
                spec.loader.exec_module(module)
                return module
            except ImportError:  # it needs the rest of the package now: take the package
                del sys.modules[_PRIVATE_NAME]
    import gguf.constants

    return gguf.constants


# Used as the package is: ``gguf.GGUFValueType``, ``gguf.Keys``, ``gguf.GGML_QUANT_SIZES``.
if TYPE_CHECKING:
    import gguf.constants as gguf
else:
    gguf = _load()
