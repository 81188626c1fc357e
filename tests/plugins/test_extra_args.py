"""extraArgs: only exact tokens from the allowlist reach a server; every other spelling is an InvalidSpec."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.config.loading import ConfigError, all_settings, resolve
from agent.engine.plugin_manager import load_plugins
from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.units import ServingUnit
from plugins.extra_args import ExtraArgsRefused
from plugins.llama_flags import LLAMA_SERVER
from plugins.llamacpp import LlamaCppExecutor
from plugins.mlx import MLX_SERVER, MLXExecutor
from plugins.xllamacpp_server import build_parser


def unit(extra: list[str], runtime: str = "llamacpp", fmt: str = "gguf") -> ServingUnit:
    model = ModelSpec(name="m", namespace="d", source="/models/m.gguf", format=fmt)
    service = ServiceSpec(name="s", namespace="d", model_ref="m", runtime=runtime, extra_args=tuple(extra))
    return ServingUnit(service=service, model=model)


def fake_binary(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# What was seen (issue 10) and its relatives: abbreviations, `=`-joined, short forms, other spellings, and the
# flags that read or write files, fetch models or listen elsewhere. The message names the flag and, where a spec
# field or the agent sets it, says so.
REFUSED = [
    (["--ctx", "131072"], '"--ctx" is not a llama-server flag: flags must be spelled in full'),
    (["--ho", "0.0.0.0"], '"--ho" abbreviates --host'),
    (["--mod", "/elsewhere/x.gguf"], '"--mod" is not a llama-server flag'),
    (["--ctx-size=99999"], '"--ctx-size" changes the server\'s memory behind its budget; set spec.contextSize'),
    (["-c", "99999"], '"-c" changes the server\'s memory behind its budget; set spec.contextSize instead'),
    (["--ctx_size", "99999"], "it is --ctx-size spelled differently"),
    (["-c99999"], '"-c99999" is not a llama-server flag'),
    (["--parallel", "8"], "set spec.parallelSlots instead"),
    (["-np=8"], "set spec.parallelSlots instead"),
    (["-ctk", "q4_0"], "set spec.cacheTypeK instead"),
    (["--cache-type-v=f32"], "set spec.cacheTypeV instead"),
    (["-fa", "on"], "set spec.flashAttention instead"),
    (["-ub", "4096"], "set spec.uBatchSize instead"),
    (["--n-gpu-layers", "0"], "set Model spec.hardware.gpu.layers instead"),
    (["--cache-ram", "8192"], "memory behind its budget; the agent sets it"),
    (["-kvu"], "memory behind its budget; the agent sets it"),
    (["--mlock"], "set mlock in the agent's config"),
    (["--host", "0.0.0.0"], '"--host" changes where or how the server listens'),
    (["--host=0.0.0.0"], '"--host" changes where or how the server listens'),
    (["--port", "80"], "listens"),
    (["-m", "/elsewhere/x.gguf"], '"-m" makes the server read or write files, or fetch a model'),
    (["--model=/elsewhere/x.gguf"], "set Model spec.source instead"),
    (["-hf", "org/repo"], "set Model spec.source instead"),
    (["--hf-repo", "org/repo"], "set Model spec.source instead"),
    (["-mu", "https://example.invalid/x.gguf"], "set Model spec.source instead"),
    (["--lora", "/tmp/a.gguf"], '"--lora" makes the server read or write files'),
    (["--mmproj", "/tmp/p.gguf"], "read or write files"),
    (["--model-draft", "/tmp/d.gguf"], "read or write files"),
    (["-md", "/tmp/d.gguf"], "read or write files"),
    (["--path", "/"], "read or write files"),
    (["--log-file", "/tmp/log"], "read or write files"),
    (["--slot-save-path", "/tmp"], "read or write files"),
    (["--chat-template-file", "/etc/passwd"], "read or write files"),
    (["--grammar-file", "/etc/passwd"], "read or write files"),
    (["--fim-qwen-7b-default"], "fetch a model"),
    (["-lv", "0"], "changes what the agent relies on"),
    (["--log-disable"], "changes what the agent relies on"),
    (["--api-key", "secret"], "is not allowed by default (an operator can allow more"),
    (["--temp", "0.7", "--host", "0.0.0.0"], '"--host" changes where'),  # found after an allowed flag too
    (["--temp", "0.7", "0.8"], '"0.8" is not a llama-server flag'),  # a stray value
    (["--jinja", "0.0.0.0"], '"0.0.0.0" is not a llama-server flag'),  # --jinja takes no value
    (["--jinja=true"], "--jinja takes no value"),
    (["--alias"], "--alias needs one value after it"),
    (["--", "--host", "0.0.0.0"], '"--" is not a llama-server flag'),
    (["--top_k", "40"], '"--top_k" is not spelled as llama-server documents it; write --top-k'),
    ([""], '"" is not a llama-server flag'),
]


@pytest.mark.parametrize(("extra", "message"), REFUSED, ids=[" ".join(e) or "empty" for e, _ in REFUSED])
def test_refused_with_a_message_naming_the_flag(tmp_path: Path, extra: list[str], message: str) -> None:
    executor = LlamaCppExecutor(binary=str(fake_binary(tmp_path / "llama-server")))
    problem = executor.check_spec(unit(extra))
    assert problem is not None and problem.startswith("extraArgs: ") and message in problem
    with pytest.raises(ExtraArgsRefused):  # and should a unit get this far, no command is built for it
        executor.command(unit(extra), Path("/models/m.gguf"), 8100)


def test_allowed_flags_reach_argv_with_their_values(tmp_path: Path) -> None:
    extra = ["--temp", "0.7", "--alias", "-c", "--jinja", "--top-k=40", "-s", "-1", "--chat-template", "chatml",
             "--reasoning-format", "deepseek", "-t", "4", "-n", "256", "--timeout", "30", "--metrics",
             "--no-slots"]  # fmt: skip
    executor = LlamaCppExecutor(binary=str(fake_binary(tmp_path / "llama-server")))
    assert executor.check_spec(unit(extra)) is None
    argv = executor.command(unit(extra), Path("/models/m.gguf"), 8100).argv
    expanded = [*extra[:5], "--top-k", "40", *extra[6:]]  # `=` is split: both parsers read two tokens
    assert argv[-len(expanded) :] == expanded
    assert argv.count("--ctx-size") == 1 and argv.count("--host") == 1  # "-c" after --alias stayed a value


def test_a_long_token_is_quoted_short() -> None:
    problem = LLAMA_SERVER.allowlist().problem(["--" + "x" * 10_000])
    assert problem is not None and len(problem) < 400


def test_every_catalogued_spelling_is_unique_and_each_flag_takes_at_most_two_values() -> None:
    for table in (LLAMA_SERVER, MLX_SERVER):
        assert all(name.startswith("-") for name in table.by_name)
        assert all(0 <= flag.values <= 2 for flag in table.entries)


# -- the operator's extension ---------------------------------------------------------------------------------
def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def executors_from(tmp_path: Path, text: str) -> dict[str, Any]:
    plugins = load_plugins(entry_points=False)
    plugins.settings = resolve(all_settings(plugins), config_file(tmp_path, text), {}).values()
    return {e.name: e for e in plugins.executors()}


def test_operators_extend_the_allowlist(tmp_path: Path) -> None:
    executors = executors_from(
        tmp_path,
        """
        [executors.llamacpp]
        extra_args_allowed = ["--props", "--api-key", "--new-flag VALUE", "--new-switch"]
        [executors.mlx]
        extra_args_allowed = ["--max-prompt-tokens"]
        """,
    )
    extra = ["--props", "--api-key", "k", "--new-flag", "-x", "--new-switch", "--temp", "1"]
    for name in ("llamacpp", "cuda"):  # the CUDA executor runs the same llama-server
        assert executors[name].check_spec(unit(extra)) is None
        assert executors[name].check_spec(unit(["--new-switch", "-x"])) is not None  # a switch takes no value
        assert executors[name].check_spec(unit(["--ctx-size", "1"])) is not None
    assert executors["mlx"].check_spec(unit(["--max-prompt-tokens", "100"], runtime="mlx")) is None
    assert executors["llamacpp"].check_spec(unit(["--max-prompt-tokens", "100"])) is not None  # per server
    defaults = executors_from(tmp_path, "")
    assert "--props" in str(defaults["llamacpp"].check_spec(unit(["--props"])))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("--ctx-size", "allowed: --ctx-size changes the server's memory behind its budget; set spec.contextSize"),
        ("-c", "-c (--ctx-size) changes the server's memory"),
        ("--ctx_size", "--ctx_size (--ctx-size) changes the server's memory"),
        ("--host", "allowed: --host changes where or how the server listens"),
        ("--ho", "--ho (--host) changes where or how the server listens"),
        ("--model", "read or write files"),
        ("-hf", "read or write files"),
        ("--lora", "read or write files"),
        ("--slot-save-path", "read or write files"),
        ("-lv", "changes what the agent relies on"),
        ("--jinja VALUE", "--jinja takes no value"),
        ("--api_key", "is not how llama-server spells it; write --api-key"),
        ("ctx-size", "is not a flag"),
        ("--x=1", "is not a flag"),
        ("--x A B", "is not a flag"),
    ],
)
def test_memory_network_and_file_flags_cannot_be_allowed(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        executors_from(tmp_path, f"[executors.llamacpp]\nextra_args_allowed = [{entry!r}]\n")
    assert "executors.llamacpp.extra_args_allowed" in str(raised.value) and message in str(raised.value)


@pytest.mark.parametrize("entry", ["--model", "--mod", "--max-kv-size", "--host", "--trust-remote-code"])
def test_mlx_config_refuses_memory_network_and_file_flags(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match=r"executors\.mlx\.extra_args_allowed"):
        executors_from(tmp_path, f"[executors.mlx]\nextra_args_allowed = [{entry!r}]\n")


def test_the_setting_has_a_flag_and_an_environment_variable(tmp_path: Path) -> None:
    plugins = load_plugins(entry_points=False)
    settings = all_settings(plugins)
    config = resolve(settings, None, {"METAL_AGENT_LLAMACPP_EXTRA_ARGS_ALLOWED": "--props,--api-key"})
    assert config["llamacpp_extra_args_allowed"] == ("--props", "--api-key")
    with pytest.raises(ConfigError, match="--parallel"):
        resolve(settings, None, {"METAL_AGENT_LLAMACPP_EXTRA_ARGS_ALLOWED": "--props,--parallel"})


# -- MLX ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mod", "/elsewhere"], '"--mod" abbreviates --model'),  # mlx_lm.server's argparse would take it
        (["--model", "/elsewhere"], "set Model spec.source instead"),
        (["--model=/elsewhere"], "set Model spec.source instead"),
        (["--ho", "0.0.0.0"], '"--ho" abbreviates --host'),
        (["--max-kv-size", "100000"], "memory behind its budget"),
        (["--max-kv", "100000"], '"--max-kv" abbreviates --max-kv-size'),
        (["--adapter-path", "/tmp/a"], "read or write files"),
        (["--trust-remote-code"], "runs Python code"),
        (["--temp"], "--temp needs one value"),
    ],
)
def test_mlx_refuses_what_changes_memory_network_or_files(extra: list[str], message: str) -> None:
    problem = MLXExecutor().check_spec(unit(extra, runtime="mlx", fmt="mlx"))
    assert problem is not None and message in problem


def test_mlx_allowed_flags_reach_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_binary(tmp_path / "mlx_lm.server")
    monkeypatch.setenv("PATH", str(tmp_path))
    extra = ["--temp=0.5", "--max-tokens", "64", "--chat-template-args", '{"enable_thinking": false}']
    launch = MLXExecutor().command(unit(extra, runtime="mlx", fmt="mlx"), tmp_path, 8100)
    assert launch.argv[-6:] == ["--temp", "0.5", "--max-tokens", "64", "--chat-template-args", extra[-1]]
    with pytest.raises(ExtraArgsRefused):
        MLXExecutor().command(unit(["--host", "0.0.0.0"], runtime="mlx", fmt="mlx"), tmp_path, 8100)


# -- the xllamacpp stand-in ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--ctx", "131072"], ["--ho", "0.0.0.0"], ["--mod", "/x.gguf"], ["--ctx-s", "1"]])
def test_the_stand_in_refuses_abbreviations(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-m", "/m.gguf", *extra])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_the_stand_in_still_reads_full_flags() -> None:
    args = build_parser().parse_args(["-m", "/m.gguf", "--ctx-size=512", "-c", "1024", "--host", "127.0.0.1"])
    assert args.ctx_size == 1024 and args.host == "127.0.0.1"
