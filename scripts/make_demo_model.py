"""Write the demo models the samples in config/samples point at (into the folder given, default ./demo)."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.estimate.tinymodel import TinyShape, write_tiny_gguf


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    path = write_tiny_gguf(out / "tiny-llama.gguf", TinyShape(n_layer=4, n_embd=128, n_head=4, n_head_kv=2))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
