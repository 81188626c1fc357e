"""CPU time of the header scan, and of a whole ``metal-agent estimate``, on a header shaped like a large model.

The file has a Qwen-sized vocabulary (152k tokens, scores, token types, 150k merges) and 1,800 tensor infos,
which is where GGUFReader spends seconds. Reported, each the median of several runs of CPU time (user + system:
on a shared machine the wall clock counts other people's work): ``read_model`` in-process, and ``metal-agent
estimate`` as a fresh process on this file and on a tiny model (the difference is what the big header costs).
Targets: read_model under 50 ms and at least 50x faster than ``gguf.GGUFReader`` (timed once: it takes seconds).
Run: python scripts/bench_header_scan.py [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cli import median_cpu, metal_agent

from agent.estimate.gguf_header import read_model
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

N_VOCAB = 152_064
N_MERGES = 150_000
N_TENSORS = 1_800
TARGET_MS = 50.0
TARGET_SPEEDUP = 50.0


def write_big_header(path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(N_TENSORS // 20)
    writer.add_context_length(32_768)
    writer.add_embedding_length(3584)
    writer.add_feed_forward_length(18_944)
    writer.add_head_count(28)
    writer.add_head_count_kv(4)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i:06d}".encode() for i in range(N_VOCAB)])
    writer.add_token_scores([float(-i) for i in range(N_VOCAB)])
    writer.add_token_types([1] * N_VOCAB)
    writer.add_token_merges([f"m{i} x{i}" for i in range(N_MERGES)])
    tensor = np.zeros(32, dtype=np.float32)
    for i in range(N_TENSORS):
        writer.add_tensor(f"blk.{i // 20}.t{i % 20}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def median_cpu_ms(run: Callable[[], object], runs: int) -> float:
    run()  # warm: page cache, byte code
    times = []
    for _ in range(runs):
        start = time.process_time()
        run()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str]) -> int:
    runs = int(argv[0]) if argv else 15
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big-header.gguf"
        write_big_header(path)
        tiny = write_tiny_gguf(Path(tmp) / "tiny.gguf", TinyShape())
        model = read_model(path)
        start = time.process_time()
        reader = gguf.GGUFReader(path)
        theirs = (time.process_time() - start) * 1000
        reader_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        if model.weights_bytes != reader_bytes or len(model.tensors) != len(reader.tensors):
            print(f"MISMATCH: read_model {model.weights_bytes} B vs GGUFReader {reader_bytes} B")
            return 1
        ours = median_cpu_ms(lambda: read_model(path), runs)
        estimate = {name: median_cpu(metal_agent("estimate", str(p), "--host-memory", "64Gi"), max(3, runs // 3))[0]
                    for name, p in (("big header", path), ("tiny model", tiny))}  # fmt: skip
        size_mib = path.stat().st_size / 2**20

    speedup = theirs / ours
    fast_ok = ours < TARGET_MS
    speed_ok = speedup >= TARGET_SPEEDUP
    print(f"file: {size_mib:.1f} MiB, {N_VOCAB} tokens, {N_MERGES} merges, {N_TENSORS} tensors")
    print(f"{'CPU time':<34}{'ms':>10}")
    print(f"{'read_model (median of ' + str(runs) + ')':<34}{ours:>10.1f}")
    print(f"{'gguf.GGUFReader (once)':<34}{theirs:>10.1f}")
    for name, seconds in estimate.items():
        print(f"{'metal-agent estimate, ' + name:<34}{seconds * 1000:>10.0f}")
    print(f"the big header costs estimate {1000 * (estimate['big header'] - estimate['tiny model']):.0f} ms more")
    print(f"speed-up: {speedup:.0f}x (target >= {TARGET_SPEEDUP:.0f}x) {'PASS' if speed_ok else 'FAIL'}")
    print(f"read_model: {ours:.1f} ms (target < {TARGET_MS:.0f} ms) {'PASS' if fast_ok else 'FAIL'}")
    return 0 if fast_ok and speed_ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
