"""The verdict: fits / InsufficientMemory / MemoryCheckFailed, enforce and warn, binding constraint, advice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.estimate.budget import resolve_budget
from agent.estimate.estimator import estimate, max_ctx_size
from agent.estimate.gguf_shape import load_shape
from agent.estimate.hostmem import HostMemory
from agent.estimate.preflight import Mode, Reason, judge, preflight
from agent.estimate.shape import ServeSettings
from agent.estimate.tinymodel import TinyShape, write_tiny_gguf

GiB, MiB = 1 << 30, 1 << 20
HOST = HostMemory(total_bytes=64 * GiB, available_bytes=48 * GiB, source="override")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "m.gguf", TinyShape(n_layer=4, n_embd=256, n_head=8))


def test_fits_with_headroom(model: Path) -> None:
    verdict = preflight(model, ServeSettings(), resolve_budget(HOST.total_bytes, "1Gi"), HOST)
    assert verdict.reason is Reason.FITS and verdict.allowed and verdict.fits
    assert verdict.estimate is not None and verdict.headroom_bytes == GiB - verdict.estimate.total_bytes
    assert "memoryBudget" in (verdict.binding or "")


def test_insufficient_memory_explains_and_advises(model: Path) -> None:
    shape, settings = load_shape(model), ServeSettings(ctx_size=4096)
    total = estimate(shape, settings).total_bytes
    verdict = judge(shape, settings, resolve_budget(HOST.total_bytes, total - 1), HOST)
    assert verdict.reason is Reason.INSUFFICIENT_MEMORY and not verdict.allowed
    assert verdict.headroom_bytes == -1
    assert "needs" in verdict.message and "largest part" in verdict.message
    best = verdict.max_ctx_size
    assert best is not None and 0 < best < 4096
    assert any(str(best) in tip for tip in verdict.advice)
    # The advice is right: at the suggested context the model fits the same budget.
    assert estimate(shape, dataclasses.replace(settings, ctx_size=best)).total_bytes <= total - 1
    assert max_ctx_size(shape, settings, total) == 4096


def test_advice_suggests_a_quantized_cache_when_that_is_what_fits(model: Path) -> None:
    shape, settings = load_shape(model), ServeSettings(ctx_size=4096, flash_attn=True)
    quantized = dataclasses.replace(settings, cache_type_k="q8_0", cache_type_v="q8_0")
    limit = estimate(shape, quantized).total_bytes
    verdict = judge(shape, settings, resolve_budget(HOST.total_bytes, limit), HOST)
    assert not verdict.fits
    assert any("q8_0" in tip for tip in verdict.advice)


def test_weights_alone_too_big_says_use_a_smaller_model(model: Path) -> None:
    verdict = preflight(model, ServeSettings(), resolve_budget(HOST.total_bytes, "1Ki"), HOST)
    assert verdict.reason is Reason.INSUFFICIENT_MEMORY and verdict.max_ctx_size == 0
    assert any("smaller" in tip for tip in verdict.advice)


def test_warn_mode_allows_but_still_says_it_does_not_fit(model: Path) -> None:
    verdict = preflight(model, ServeSettings(), resolve_budget(HOST.total_bytes, "1Ki"), HOST, Mode.WARN)
    assert verdict.reason is Reason.INSUFFICIENT_MEMORY and verdict.allowed
    assert "warn" in verdict.message


def test_host_total_binds_when_the_budget_is_larger(model: Path) -> None:
    small_host = HostMemory(total_bytes=8 * MiB, available_bytes=8 * MiB, source="override")
    verdict = preflight(model, ServeSettings(), resolve_budget(small_host.total_bytes, "1Ti"), small_host)
    assert verdict.limit_bytes == 8 * MiB and "host memory" in (verdict.binding or "")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a model at all"])
def test_unreadable_model_fails_closed(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    budget = resolve_budget(HOST.total_bytes, "1Gi")
    verdict = preflight(bad, ServeSettings(), budget, HOST)
    assert verdict.reason is Reason.MEMORY_CHECK_FAILED and not verdict.allowed
    assert "cannot read the model" in verdict.message
    warned = preflight(bad, ServeSettings(), budget, HOST, Mode.WARN)
    assert warned.reason is Reason.MEMORY_CHECK_FAILED and warned.allowed


def test_missing_file_fails_closed(tmp_path: Path) -> None:
    verdict = preflight(tmp_path / "nope.gguf", ServeSettings(), resolve_budget(HOST.total_bytes, "1Gi"), HOST)
    assert verdict.reason is Reason.MEMORY_CHECK_FAILED and not verdict.allowed


def test_invalid_settings_are_never_allowed_even_in_warn_mode(model: Path) -> None:
    settings = ServeSettings(cache_type_v="q8_0")  # a quantized V cache without flash attention
    for mode in Mode:
        verdict = preflight(model, settings, resolve_budget(HOST.total_bytes, "1Gi"), HOST, mode)
        assert verdict.reason is Reason.INVALID_SPEC and not verdict.allowed
        assert "flash attention" in verdict.message


def test_fallback_estimates_say_so(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinyShape())
    shape = dataclasses.replace(load_shape(path), missing=("llama.context_length",))
    est = estimate(shape, ServeSettings())
    assert est.fallback and any("conservative" in note for note in est.notes)
