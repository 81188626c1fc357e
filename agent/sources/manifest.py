"""LLMKube ``Model`` and ``InferenceService`` objects (inference.llmkube.dev/v1alpha1), parsed and validated.

Field names follow LLMKube so the agent can join an existing cluster. Validation happens here, once, with the
field path in every message, so a bad manifest is reported where it is written and never reaches a spawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from agent.estimate.budget import Budget, resolve_budget
from agent.estimate.kvcache import cache_type
from agent.estimate.shape import ServeSettings
from agent.util.duration import parse_duration
from agent.util.quantity import InvalidValue, parse_fraction, parse_quantity
from agent.util.redact import quoted
from agent.util.safe_files import read_bytes

GROUP = "inference.llmkube.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_CTX_SIZE = 4096
DEFAULT_IDLE_TIMEOUT = 600.0  # spec.idleTimeout of an on-demand unit: 10m
MIN_CTX_SIZE, MAX_CTX_SIZE = 128, 2_097_152
ACCELERATORS = ("cpu", "metal", "cuda", "rocm", "intel", "vulkan")
FORMATS = ("gguf", "mlx", "safetensors", "pytorch", "custom")
PRIORITIES = ("critical", "high", "normal", "low", "batch")
MAX_MANIFEST_BYTES = 1 << 20  # the default of the manifest_max_size setting
MAX_DOCUMENTS = 1000  # YAML documents in one manifest file
MAX_DEPTH = 64  # nesting of mappings and sequences; a manifest needs about 6
# libyaml where the wheel has it (it does on the platforms we ship), the pure-Python parser otherwise.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(ValueError):
    """An invalid manifest: says where (file, document, field) and what."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    namespace: str
    source: str
    format: str = "gguf"
    sha256: str | None = None
    accelerator: str = "cpu"
    gpu_layers: int | None = None
    gpu_count: int | None = None
    memory_budget: str | None = None
    memory_fraction: float | None = None
    generation: int = 0
    origin: str = ""  # file (standalone) or API path the object came from; relative sources resolve beside it

    def budget(self, host_total_bytes: int, agent_fraction: object = None) -> Budget:
        return resolve_budget(host_total_bytes, self.memory_budget, self.memory_fraction, agent_fraction)

    def local_path(self) -> Path | None:
        """The model file for local sources (absolute path, ``file://`` or relative to the manifest); else None."""
        parsed = urlparse(self.source)
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme and len(parsed.scheme) > 1:  # https://, hf://, s3://, pvc:// (one letter: a drive)
            return None
        path = Path(self.source).expanduser()
        if not path.is_absolute() and self.origin:
            path = Path(os.path.abspath(Path(self.origin).parent / path))
        return path


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    model_ref: str
    runtime: str = "llamacpp"
    replicas: int = 1
    suspend: bool = False
    context_size: int | None = None
    parallel_slots: int | None = None
    flash_attention: bool | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    batch_size: int | None = None
    ubatch_size: int | None = None
    extra_args: tuple[str, ...] = ()
    priority: str = "normal"
    eviction_protection: bool = False
    # Serve on demand (agent/engine/ondemand.py): Idle until a request names it, stopped after idle_timeout seconds.
    on_demand: bool = False
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # contextSize: auto (agent/memory/context_auto.py): the largest context that fits, at least min_context_size.
    context_auto: bool = False
    min_context_size: int | None = None
    alias: str | None = None  # another name /v1 requests may use for this unit
    generation: int = 0
    origin: str = ""

    def settings(self) -> ServeSettings:
        base = ServeSettings()
        return ServeSettings(
            ctx_size=self.context_size or DEFAULT_CTX_SIZE,
            parallel=self.parallel_slots or 1,
            cache_type_k=self.cache_type_k or base.cache_type_k,
            cache_type_v=self.cache_type_v or base.cache_type_v,
            flash_attn=bool(self.flash_attention),
            n_batch=self.batch_size or base.n_batch,
            n_ubatch=self.ubatch_size or base.n_ubatch,
        )


class _Fields:
    """Typed access to one object's fields that names the full path in every error."""

    def __init__(self, data: Mapping[str, Any], where: str, path: str) -> None:
        self.data, self.where, self.path = data, where, path

    def fail(self, key: str, problem: str) -> ManifestError:
        return ManifestError(f"{self.where}: {self.path}{key}: {problem}")

    def sub(self, key: str) -> _Fields:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        return _Fields(value, self.where, f"{self.path}{key}.")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.fail(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; a YAML `true` where a number belongs is still an error.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {quoted(value)}")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {quoted(value)}")
        if required and value == "":
            raise self.fail(key, "must not be empty")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value: str = self.get(key, str, default)
        if value not in choices:
            raise self.fail(key, f"{quoted(value)} is not one of {', '.join(choices)}")
        return value

    def int_in(self, key: str, low: int, high: int) -> int | None:
        value: int | None = self.get(key, int)
        if value is not None and not low <= value <= high:
            raise self.fail(key, f"{value} is outside {low}..{high}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _metadata(obj: Mapping[str, Any], where: str) -> tuple[str, str, int]:
    meta = _Fields(obj, where, "").sub("metadata")
    name: str = meta.get("name", str, required=True)
    namespace: str = meta.get("namespace", str, "default")
    generation: int = meta.get("generation", int, 0)
    return name, namespace, generation


def parse_model(obj: Mapping[str, Any], where: str) -> ModelSpec:
    name, namespace, generation = _metadata(obj, where)
    spec = _Fields(obj, where, "").sub("spec")
    hardware = spec.sub("hardware")
    budget = hardware.get("memoryBudget", (str, int))
    fraction = hardware.get("memoryFraction", (int, float))
    try:
        if budget is not None:
            parse_quantity(budget, "spec.hardware.memoryBudget")
        if fraction is not None:
            parse_fraction(fraction, "spec.hardware.memoryFraction")
    except InvalidValue as exc:
        raise ManifestError(f"{where}: {exc}") from exc
    sha256 = spec.get("sha256", str)
    if sha256 is not None and (len(sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha256)):
        raise spec.fail("sha256", "must be 64 hexadecimal characters")
    return ModelSpec(
        name=name,
        namespace=namespace,
        source=spec.get("source", str, required=True),
        format=spec.choice("format", FORMATS, "gguf"),
        sha256=sha256,
        accelerator=hardware.choice("accelerator", ACCELERATORS, "cpu"),
        gpu_layers=hardware.sub("gpu").int_in("layers", -1, 100_000),
        gpu_count=hardware.sub("gpu").int_in("count", 1, 64),
        memory_budget=str(budget) if budget is not None else None,
        memory_fraction=float(fraction) if fraction is not None else None,
        generation=generation,
        origin=where,
    )


def parse_service(obj: Mapping[str, Any], where: str) -> ServiceSpec:
    name, namespace, generation = _metadata(obj, where)
    spec = _Fields(obj, where, "").sub("spec")
    cache_types = {}
    for key, custom in (("cacheTypeK", "cacheTypeCustomK"), ("cacheTypeV", "cacheTypeCustomV")):
        value = spec.get(custom, str) or spec.get(key, str)
        if value is not None:
            try:
                cache_type(value, f"spec.{key}")
            except ValueError as exc:
                raise ManifestError(f"{where}: {exc}") from exc
        cache_types[key] = value
    context_auto = spec.data.get("contextSize") == "auto"  # else an integer, checked below
    extra = spec.get("extraArgs", list, [])
    if not all(isinstance(arg, str) for arg in extra):
        raise spec.fail("extraArgs", "must be a list of strings")
    return ServiceSpec(
        name=name,
        namespace=namespace,
        model_ref=spec.get("modelRef", str, required=True),
        runtime=spec.get("runtime", str, "llamacpp"),
        replicas=_default(spec.int_in("replicas", 0, 1_000), 1),
        suspend=spec.get("suspend", bool, False),
        context_size=None if context_auto else spec.int_in("contextSize", MIN_CTX_SIZE, MAX_CTX_SIZE),
        parallel_slots=spec.int_in("parallelSlots", 1, 64),
        flash_attention=spec.get("flashAttention", bool),
        cache_type_k=cache_types["cacheTypeK"],
        cache_type_v=cache_types["cacheTypeV"],
        batch_size=spec.int_in("batchSize", 1, 1 << 20),
        ubatch_size=spec.int_in("uBatchSize", 1, 1 << 20),
        extra_args=tuple(extra),
        priority=spec.choice("priority", PRIORITIES, "normal"),
        eviction_protection=spec.get("evictionProtection", bool, False),
        on_demand=spec.get("onDemand", bool, False),
        idle_timeout=_duration(spec, "idleTimeout", where),
        context_auto=context_auto,
        min_context_size=spec.int_in("minContextSize", MIN_CTX_SIZE, MAX_CTX_SIZE),
        alias=_alias(spec),
        generation=generation,
        origin=where,
    )


def _duration(spec: _Fields, key: str, where: str) -> float:
    text = spec.get(key, str)
    if text is None:
        return DEFAULT_IDLE_TIMEOUT
    try:
        return parse_duration(text, f"spec.{key}")
    except InvalidValue as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def _alias(spec: _Fields) -> str | None:
    alias: str | None = spec.get("alias", str)
    if alias is not None and (not alias or len(alias) > 253 or not alias.isprintable() or alias != alias.strip()):
        raise spec.fail("alias", f"{alias!r} is not a model name (1-253 printable characters, no outer spaces)")
    return alias


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def parse_object(obj: object, where: str) -> ModelSpec | ServiceSpec:
    if not isinstance(obj, Mapping):
        raise ManifestError(f"{where}: a manifest must be a mapping, got {type(obj).__name__}")
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if api_version != API_VERSION:
        raise ManifestError(f"{where}: apiVersion: expected {API_VERSION}, got {quoted(api_version)}")
    if kind == "Model":
        return parse_model(obj, where)
    if kind == "InferenceService":
        return parse_service(obj, where)
    raise ManifestError(f"{where}: kind: expected Model or InferenceService, got {quoted(kind)}")


def iter_documents(path: Path, max_bytes: int = MAX_MANIFEST_BYTES) -> Iterator[tuple[str, object]]:
    """Each non-empty YAML document of a file with its location ``file#index``.

    Only a regular file of at most ``max_bytes`` is read (never a FIFO or a device, see agent/util/safe_files.py).
    """
    try:
        data = read_bytes(path, max_bytes)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {_reason(exc)}") from exc
    return _documents(path, data)


def _documents(path: Path, data: bytes) -> Iterator[tuple[str, object]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: cannot read: {_reason(exc)}") from exc
    documents = parse_yaml(text, str(path))
    for index, document in enumerate(documents):
        if document is not None:
            yield (f"{path}#{index}" if len(documents) > 1 else str(path)), document


def parse_documents(path: Path, data: bytes) -> list[ModelSpec | ServiceSpec]:
    """The objects of a manifest file's content (already read, see ``load_file``)."""
    return [parse_object(document, where) for where, document in _documents(path, data)]


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def parse_yaml(text: str, where: str) -> list[object]:
    """The documents of a manifest file, refusing what Kubernetes manifests never need and a bomb needs.

    A first pass over the parser's events (libyaml, no objects built) refuses aliases (a 564-byte alias bomb
    expands to gigabytes), more than ``MAX_DOCUMENTS`` documents and nesting deeper than ``MAX_DEPTH`` (the
    composer recurses); only then are the objects built.
    """
    depth = documents = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                anchor = (event.anchor or "")[:40]
                raise ManifestError(f"{where}: YAML aliases (*{anchor}) are not allowed in manifests{_at(event)}")
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > MAX_DOCUMENTS:
                    raise ManifestError(f"{where}: more than {MAX_DOCUMENTS} YAML documents in one file")
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ManifestError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels{_at(event)}")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise ManifestError(f"{where}: invalid YAML: {_clip(message)}") from exc


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def load_file(path: Path, max_bytes: int = MAX_MANIFEST_BYTES) -> list[ModelSpec | ServiceSpec]:
    return [parse_object(document, where) for where, document in iter_documents(path, max_bytes)]
