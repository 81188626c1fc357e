"""Measure what real llama.cpp allocates for a matrix of tiny models and settings (calibration data).

Writes one JSON line per run (to --out, default stdout): the model shape, the settings, llama.cpp's reported
buffers and the server's RSS. docs/calibration.md is derived from this output. ``--archs`` measures the tiny
models of agent/estimate/tinyarch.py instead (``--archs mamba2 mamba2-wide mamba2-state`` is the SSM fit, swept over
n_ubatch and slots with ``--sweep``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # calibrate.py

from calibrate import measure

from agent.estimate.gguf_shape import load_shape
from agent.estimate.kvcache import InvalidSettings, kv_cache_bytes
from agent.estimate.shape import ServeSettings
from agent.estimate.tinyarch import BUILDERS, write_arch_gguf
from agent.estimate.tinymodel import TinyShape, n_vocab, write_tiny_gguf

SHAPES = {
    "small": TinyShape(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab_extra=200),
    "wide": TinyShape(n_layer=2, n_embd=512, n_head=8, n_head_kv=8, n_ff=1024, n_vocab_extra=200),
    "vocab": TinyShape(n_layer=2, n_embd=128, n_head=4, n_head_kv=1, n_ff=256, n_vocab_extra=8000),
    "ff": TinyShape(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=4096, n_vocab_extra=200),
    "heads": TinyShape(n_layer=4, n_embd=256, n_head=16, n_head_kv=4, head_dim=32, n_ff=512, n_vocab_extra=1000),
    "moe": TinyShape(
        n_layer=2,
        n_embd=128,
        n_head=4,
        n_head_kv=2,
        n_ff=256,
        n_expert=8,
        n_expert_used=2,
        n_vocab_extra=1000,
    ),
}
SETTINGS = [
    ServeSettings(ctx_size=512),
    ServeSettings(ctx_size=4096),
    ServeSettings(ctx_size=16384),
    ServeSettings(ctx_size=4096, flash_attn=True),
    ServeSettings(ctx_size=16384, flash_attn=True),
    ServeSettings(ctx_size=4096, n_ubatch=256),
    ServeSettings(ctx_size=8192, parallel=4),
    ServeSettings(ctx_size=4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn=True),
]


# The SSM fit: micro-batches from 64 to 1024 tokens, one and four sequences.
SWEEP = [ServeSettings(ctx_size=4096, n_ubatch=ub, parallel=np) for ub in (64, 128, 256, 512, 1024) for np in (1, 4)]


def measure_archs(names: list[str], settings_list: list[ServeSettings], out: TextIO) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = write_arch_gguf(Path(tmp) / f"{name}.gguf", name)
            for settings in settings_list:
                m = measure(path, settings)
                row = {
                    "arch": name,
                    "settings": dataclasses.asdict(settings),
                    "model": m.report.model_bytes,
                    "kv": m.report.kv_bytes,
                    "state": m.report.state_bytes,
                    "output": m.report.output_bytes,
                    "compute": m.report.compute_bytes,
                    "rss": m.rss_bytes,
                }
                print(json.dumps(row), file=out, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shapes", nargs="*", default=sorted(SHAPES))
    parser.add_argument("--archs", nargs="*", choices=sorted(BUILDERS), help="tiny architecture models instead")
    parser.add_argument("--sweep", action="store_true", help="with --archs: the n_ubatch x slots sweep")
    args = parser.parse_args()
    out = args.out.open("w") if args.out else sys.stdout
    if args.archs:
        measure_archs(args.archs, SWEEP if args.sweep else SETTINGS, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            shape = SHAPES[name]
            path = write_tiny_gguf(Path(tmp) / f"{name}.gguf", shape)
            for settings in SETTINGS:
                try:
                    kv_cache_bytes(load_shape(path), settings)
                except InvalidSettings:
                    continue  # llama.cpp refuses these settings for this shape
                m = measure(path, settings)
                row = {
                    "shape": name,
                    **dataclasses.asdict(shape),
                    "n_vocab": n_vocab(shape),
                    "settings": dataclasses.asdict(settings),
                    "model": m.report.model_bytes,
                    "kv": m.report.kv_bytes,
                    "cells": [r.cells for r in m.report.kv],
                    "output": m.report.output_bytes,
                    "compute": m.report.compute_bytes,
                    "rss": m.rss_bytes,
                }
                print(json.dumps(row), file=out, flush=True)


if __name__ == "__main__":
    main()
