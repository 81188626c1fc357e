"""Time agent.gguf_header.read_model against gguf.GGUFReader on a header shaped like a real large model.

The file has a Qwen-sized vocabulary (152k tokens, scores, token types, 150k merges) and 1,800 tensor infos,
which is where GGUFReader spends seconds. Targets: read_model under 50 ms and at least 50x faster.
Run: python scripts/bench_header_scan.py
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
from agent.gguf_header import read_model

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


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big-header.gguf"
        write_big_header(path)
        model = read_model(path)
        reader = gguf.GGUFReader(path)
        reader_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        if model.weights_bytes != reader_bytes or len(model.tensors) != len(reader.tensors):
            print(f"MISMATCH: read_model {model.weights_bytes} B vs GGUFReader {reader_bytes} B")
            return 1
        ours = median_ms(lambda: read_model(path), repeats=15)
        theirs = median_ms(lambda: gguf.GGUFReader(path), repeats=3)
        size_mib = path.stat().st_size / 2**20

    speedup = theirs / ours
    fast_ok = ours < TARGET_MS
    speed_ok = speedup >= TARGET_SPEEDUP
    print(f"file: {size_mib:.1f} MiB, {N_VOCAB} tokens, {N_MERGES} merges, {N_TENSORS} tensors")
    print(f"{'reader':<22}{'median ms':>12}")
    print(f"{'agent read_model':<22}{ours:>12.1f}")
    print(f"{'gguf.GGUFReader':<22}{theirs:>12.1f}")
    print(f"speed-up: {speedup:.0f}x (target >= {TARGET_SPEEDUP:.0f}x) {'PASS' if speed_ok else 'FAIL'}")
    print(f"read_model: {ours:.1f} ms (target < {TARGET_MS:.0f} ms) {'PASS' if fast_ok else 'FAIL'}")
    return 0 if fast_ok and speed_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
