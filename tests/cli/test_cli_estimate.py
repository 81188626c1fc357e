"""``metal-agent estimate``: exit codes, JSON contract, human output, manifests and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", TinyShape(n_layer=4, n_embd=128))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object]]:
    code = main(["estimate", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_json_contract(gguf_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run_json(capsys, str(gguf_path), "--host-memory", "16Gi", "--ctx-size", "1000")
    assert code == 0 and result["fits"] is True
    model, settings = result["model"], result["settings"]
    estimate, budget = result["estimate"], result["budget"]
    assert isinstance(model, dict) and isinstance(settings, dict)
    assert isinstance(estimate, dict) and isinstance(budget, dict)
    assert model["architecture"] == "llama" and model["block_count"] == 4 and model["context_length"] == 4096
    assert model["file_bytes"] == gguf_path.stat().st_size
    assert settings == {
        "ctx_size": 1000,
        "parallel": 1,
        "cache_type_k": "f16",
        "cache_type_v": "f16",
        "flash_attn": False,
        "n_ubatch": 512,
    }
    parts = ("weights_bytes", "kv_cache_bytes", "compute_bytes", "overhead_bytes")
    assert all(isinstance(estimate[k], int) and estimate[k] > 0 for k in parts)
    assert estimate["total_bytes"] == sum(estimate[k] for k in parts)  # type: ignore[misc]
    assert estimate["kv_cache_bytes"] == 4 * 1024 * 2 * 32 * 2 * 2  # layers x cells x heads_kv x dim x K,V x f16
    assert budget == {
        "bytes": int(16 * GiB * 0.67),
        "source": "adaptive",
        "fraction": 0.67,
        "host_total_bytes": 16 * GiB,
    }
    assert result["headroom_bytes"] == budget["bytes"] - estimate["total_bytes"]  # type: ignore[operator]
    assert result["max_ctx_size"] == 4096  # capped at the training context


def test_does_not_fit_exits_1_and_explains(gguf_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run_json(capsys, str(gguf_path), "--memory-budget", "2Mi")
    assert code == 1 and result["fits"] is False and result["reason"] == "InsufficientMemory"
    assert isinstance(result["headroom_bytes"], int) and result["headroom_bytes"] < 0
    assert result["budget"] == {
        "bytes": 2 * MiB,
        "source": "model-budget",
        "fraction": None,
        "host_total_bytes": result["budget"]["host_total_bytes"],
    }  # type: ignore[index]
    assert result["advice"], "a verdict that does not fit says what would"


def test_max_ctx_size_is_the_largest_context_that_fits(gguf_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run_json(capsys, str(gguf_path), "--ctx-size", "4096", "--memory-budget", "100Gi")
    assert code == 0
    total_at_4096 = result["estimate"]["total_bytes"]  # type: ignore[index]
    code, tight = run_json(capsys, str(gguf_path), "--ctx-size", "4096", "--memory-budget", str(total_at_4096 - 1))
    assert code == 1
    best = tight["max_ctx_size"]
    assert isinstance(best, int) and 0 < best < 4096
    code, _ = run_json(capsys, str(gguf_path), "--ctx-size", str(best), "--memory-budget", str(total_at_4096 - 1))
    assert code == 0
    code, _ = run_json(capsys, str(gguf_path), "--ctx-size", str(best + 256), "--memory-budget", str(total_at_4096 - 1))
    assert code == 1


def test_human_output_has_a_table_and_the_verdict(gguf_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(gguf_path), "--memory-budget", "2Mi"]) == 1
    out = capsys.readouterr().out
    for word in ("weights", "KV cache", "compute", "overhead", "total", "InsufficientMemory", "to fit"):
        assert word in out


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--memory-budget", "24GB"], "24GB"),
        (["--memory-budget=-1Gi"], "-1Gi"),
        (["--memory-budget", "-1Gi"], "--memory-budget"),
        (["--cache-type-k", "q2_k"], "q2_k"),
        (["--memory-budget", "0"], "0"),
        (["--memory-fraction", "1.5"], "1.5"),
        (["--memory-fraction", "nan"], "nan"),
        (["--memory-fraction", "inf"], "inf"),
        (["--memory-fraction", "0"], "0"),
        (["--host-memory", "lots"], "lots"),
        (["--ctx-size", "0"], "ctx"),
        (["--cache-type-v", "q8_0"], "flash attention"),
    ],
)
def test_invalid_input_exits_2_with_one_error_line(
    gguf_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    assert main(["estimate", str(gguf_path), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_agent_fraction_from_the_environment(
    gguf_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METAL_AGENT_MEMORY_FRACTION", "0.5")
    _, result = run_json(capsys, str(gguf_path), "--host-memory", "64Gi")
    assert result["budget"] == {
        "bytes": 32 * GiB,
        "source": "agent",
        "fraction": 0.5,
        "host_total_bytes": 64 * GiB,
    }
    monkeypatch.setenv("METAL_AGENT_MEMORY_FRACTION", "NaN")
    assert main(["estimate", str(gguf_path)]) == 2
    assert "METAL_AGENT_MEMORY_FRACTION" in capsys.readouterr().err


def test_agent_fraction_and_host_memory_from_the_config_file(
    gguf_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[memory]\nfraction = 0.25\nhost_memory = "32Gi"\n')
    _, result = run_json(capsys, str(gguf_path), "--config", str(config))
    assert result["budget"] == {"bytes": 8 * GiB, "source": "agent", "fraction": 0.25, "host_total_bytes": 32 * GiB}
    _, result = run_json(capsys, str(gguf_path), "--config", str(config), "--host-memory", "64Gi")
    assert result["budget"]["host_total_bytes"] == 64 * GiB  # the flag wins over the agent's setting
    config.write_text("[memory]\nfraction = 2\n")
    assert main(["estimate", str(gguf_path), "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: memory.fraction: 2 is out of range")


@pytest.mark.parametrize(
    "content",
    [b"", b"GGUF", b"NOPE" + bytes(100), b"GGUF\x03\x00\x00\x00" + b"\xff" * 16],
)
def test_unreadable_models_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert main(["estimate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(tmp_path / "nope.gguf")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_manifest_budget_applies_and_flags_override(
    gguf_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "apiVersion: inference.llmkube.dev/v1alpha1\nkind: Model\nmetadata: {name: tiny}\n"
        f"spec:\n  source: {gguf_path}\n  hardware: {{memoryBudget: 3Mi, memoryFraction: 0.9}}\n"
        "---\napiVersion: inference.llmkube.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: tiny}\n"
        "spec: {modelRef: tiny, contextSize: 2048, parallelSlots: 2}\n"
    )
    code, result = run_json(capsys, str(manifest))
    assert result["budget"]["source"] == "model-budget" and result["budget"]["bytes"] == 3 * MiB  # type: ignore[index]
    assert result["settings"]["ctx_size"] == 2048 and result["settings"]["parallel"] == 2  # type: ignore[index]
    code, result = run_json(
        capsys, str(manifest), "--memory-fraction", "0.5", "--ctx-size", "512", "--host-memory", "8Gi"
    )
    assert code == 0
    assert result["budget"] == {
        "bytes": 4 * GiB,
        "source": "model-fraction",
        "fraction": 0.5,
        "host_total_bytes": 8 * GiB,
    }
    assert result["settings"]["ctx_size"] == 512  # type: ignore[index]


def test_manifest_with_invalid_budget_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "model.yaml"
    manifest.write_text(
        "apiVersion: inference.llmkube.dev/v1alpha1\nkind: Model\nmetadata: {name: tiny}\n"
        "spec:\n  source: x.gguf\n  hardware: {memoryFraction: 1.5}\n"
    )
    assert main(["estimate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "memoryFraction" in err and "model.yaml" in err


def test_console_script_runs_without_traceback(gguf_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "metal-agent"), "estimate", str(gguf_path), "--memory-budget", "24gb"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error:") and "Traceback" not in done.stderr
