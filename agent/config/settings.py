"""Every agent setting, declared once: TOML key, flag, environment variable, type, default, check and help.

The ``run`` flags, the environment names, the TOML validation, ``config show`` and the sample file are all
derived from ``SETTINGS`` (plus what plugins declare through the ``agent_settings`` hook), so a new setting is
one ``Setting(...)`` line. Values from every source go through the same ``Kind``: TOML hands over typed
values, flags and environment variables hand over text, which ``Kind.from_text`` turns into the TOML type first.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.kube_settings import check_label_selector, check_namespace, parse_accelerators, parse_only
from agent.estimate.preflight import Mode
from agent.util import logs
from agent.util.quantity import InvalidValue, format_bytes, parse_fraction, parse_quantity, shown

ENV_PREFIX = "METAL_AGENT_"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _same(text: str, _field: str) -> Any:
    return text


def toml_value(value: Any) -> str:
    """A default as TOML writes it (for the sample file and --help)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    return repr(value)


def _identity(value: Any) -> Any:
    return value


def _describe(value: Any) -> str:
    return str(value)


@dataclass(frozen=True)
class Kind:
    """A setting's type: which TOML types it takes, how it checks and converts a value, how it shows one."""

    name: str
    toml_types: tuple[type, ...]
    convert: Callable[[Any, str], Any]  # checked value -> the value the agent uses; raises InvalidValue
    from_text: Callable[[str, str], Any] = _same  # flag or environment text -> a TOML-typed value
    show: Callable[[Any], Any] = _identity  # value -> its TOML/JSON form
    describe: Callable[[Any], str] = _describe  # value -> text for the `config show` table
    metavar: str = "VALUE"
    is_path: bool = False  # relative paths in a config file are taken relative to that file
    choices: tuple[str, ...] = ()
    repeatable: bool = False  # a list: the flag may be given more than once, each a comma-separated list

    def check(self, value: Any, where: str) -> Any:
        is_bool = isinstance(value, bool)  # a bool is an int in Python, not in TOML
        if (is_bool and bool not in self.toml_types) or not isinstance(value, self.toml_types):
            text = str(value).lower() if is_bool else shown(value)  # as TOML writes it
            raise InvalidValue(f"{where}: expected {self.name}, got {_toml_type(value)} {text}")
        return self.convert(value, where)


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


def _number_text(text: str, where: str) -> int | float:
    if not text.isascii():  # int() and float() take other scripts' digits; a setting is written in ASCII
        raise InvalidValue(f"{where}: {shown(text)} is not a number")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise InvalidValue(f"{where}: {shown(text)} is not a number") from None


def _integer_text(text: str, where: str) -> int:
    if not text.isascii():
        raise InvalidValue(f"{where}: {shown(text)} is not a whole number")
    try:
        return int(text)
    except ValueError:
        raise InvalidValue(f"{where}: {shown(text)} is not a whole number") from None


def _bool_text(text: str, where: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise InvalidValue(f"{where}: {shown(text)} is not a boolean (use one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")


def seconds(minimum: float = 0.0, maximum: float = 86400.0) -> Kind:
    """A duration in seconds, finite, above ``minimum`` (exclusive) and at most ``maximum``."""

    def convert(value: int | float, where: str) -> float:
        if not math.isfinite(value) or not minimum < value <= maximum:
            raise InvalidValue(f"{where}: {shown(value)} is out of range (seconds, {minimum:g} < s <= {maximum:g})")
        return float(value)

    return Kind("seconds", (int, float), convert, _number_text, metavar="SECONDS")


def integer(minimum: int, maximum: int, unit: str = "") -> Kind:
    def convert(value: int, where: str) -> int:
        if not minimum <= value <= maximum:
            raise InvalidValue(f"{where}: {value} is out of range ({minimum}-{maximum}{unit})")
        return value

    return Kind(f"integer {minimum}-{maximum}", (int,), convert, _integer_text, metavar="N")


def enum_choice(options: type[enum.Enum]) -> Kind:
    values = tuple(str(member.value) for member in options)

    def convert(value: str, where: str) -> enum.Enum:
        if value not in values:
            raise InvalidValue(f"{where}: {shown(value)} is not one of {', '.join(values)}")
        return options(value)

    return Kind("one of " + "/".join(values), (str,), convert, show=lambda v: v.value, choices=values)


def text_choice(values: tuple[str, ...]) -> Kind:
    """One of ``values``, in any case (``DEBUG`` is ``debug``)."""

    def convert(value: str, where: str) -> str:
        name = value.strip().lower()
        if name not in values:
            raise InvalidValue(f"{where}: {shown(value)} is not one of {', '.join(values)}")
        return name

    return Kind("one of " + "/".join(values), (str,), convert, choices=values)


def text(check: Callable[[str, str], Any], name: str, metavar: str) -> Kind:
    """A string that ``check(value, where)`` validates (and may convert)."""
    return Kind(name, (str,), check, metavar=metavar)


def string_list(parse: Callable[[list[str], str], Any], name: str, metavar: str, is_path: bool = False) -> Kind:
    """A TOML array of strings, or (flag, environment) comma-separated text; ``parse`` checks the items."""

    def convert(value: str | list[Any], where: str) -> Any:
        items = [value] if isinstance(value, str) else value
        if not all(isinstance(item, str) for item in items):
            raise InvalidValue(f"{where}: expected {name}, got {shown(value)}")
        return parse(items, where)

    def show(value: Any) -> list[str]:
        return sorted(map(str, value))

    return Kind(name, (str, list), convert, show=show, describe=lambda v: ",".join(show(v)), metavar=metavar,
                repeatable=True, is_path=is_path)  # fmt: skip


def port_range(text: str, field: str = "--ports") -> range:
    """``8100-8199`` (or one port, ``9000``) as a range of ports."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise InvalidValue(f"{field}: {text!r} is not a port range like 8100-8199") from None
    if not 1 <= low <= high <= 65535:
        raise InvalidValue(f"{field}: {text!r} is outside 1-65535 or reversed")
    return range(low, high + 1)


def _path(value: str, where: str) -> Path:
    if not value or "\0" in value:
        raise InvalidValue(f"{where}: {shown(value)} is not a path")
    return Path(value).expanduser()


QUANTITY = Kind(
    "quantity (e.g. 64Gi)",
    (str, int),
    lambda value, where: parse_quantity(value, where),
    describe=lambda v: f"{v} ({format_bytes(v)})",
    metavar="Q",
)
DISK_QUANTITY = Kind(
    "quantity (e.g. 1Gi, 0 for none)",
    (str, int),
    lambda value, where: parse_quantity(value, where, positive=False),
    describe=lambda v: f"{v} ({format_bytes(v)})",
    metavar="Q",
)


def _ratio(value: int | float, where: str) -> float:
    if not math.isfinite(value) or not 0 <= value < 1:
        raise InvalidValue(f"{where}: {shown(value)} is out of range (a number with 0 <= x < 1)")
    return float(value)


RATIO = Kind("number (0 <= x < 1)", (int, float), _ratio, _number_text, metavar="X")
PATHS = string_list(
    lambda items, where: tuple(_path(item, where) for item in items), "list of paths", "DIR", is_path=True
)
FRACTION = Kind("fraction (0 < f <= 1)", (int, float), parse_fraction, _number_text, metavar="F")
BOOLEAN = Kind("boolean", (bool,), lambda value, where: value, _bool_text, describe=lambda v: str(v).lower())
PATH = Kind("path", (str,), _path, show=str, metavar="PATH", is_path=True)
HOST = Kind("host name or address", (str,), lambda value, where: _host(value, where), metavar="HOST")
PORTS = Kind(
    "port range (e.g. 8100-8199)",
    (str, int),
    lambda value, where: port_range(str(value), where),
    show=lambda v: f"{v.start}-{v.stop - 1}",
    describe=lambda v: f"{v.start}-{v.stop - 1}",
    metavar="FIRST-LAST",
)
PORT = integer(1, 65535)


def _ip_address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidValue(f"{where}: {shown(value)} is not an IP address") from None


IP_ADDRESS = Kind("IP address", (str,), _ip_address, metavar="IP")


def _host(value: str, where: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise InvalidValue(f"{where}: {shown(value)} is not a host name or address")
    return value


def _file_mode(value: str, where: str) -> int:
    """An octal permission string (``0640``); a mode that gives others write access is refused."""
    try:
        mode = int(value, 8)
    except ValueError:
        raise InvalidValue(f"{where}: {shown(value)} is not an octal file mode like 0640") from None
    if not 0o400 <= mode <= 0o777 or mode & 0o022 or not mode & 0o400:
        raise InvalidValue(f"{where}: {value} must let the owner read, and no one else write (e.g. 0640, 0600)")
    return mode


FILE_MODE = Kind("octal file mode (e.g. 0640)", (str,), _file_mode, show=lambda v: f"{v:04o}",
                 describe=lambda v: f"{v:04o}", metavar="MODE")  # fmt: skip


def _env_names(items: list[str], where: str) -> tuple[str, ...]:
    for item in items:
        name = item.removesuffix("*")
        if not name or not all(c.isalnum() or c == "_" for c in name) or not name.isascii():
            raise InvalidValue(f"{where}: {shown(item)} is not an environment variable name (or PREFIX*)")
    return tuple(items)


@dataclass(frozen=True)
class Setting:
    """One setting. ``name`` is the flag (``--memory-fraction``), environment (``METAL_AGENT_MEMORY_FRACTION``)
    and argparse name; ``section``.``key`` its place in the TOML file; ``field`` its ``AgentConfig`` field."""

    name: str
    section: str
    key: str
    kind: Kind
    default: Any  # in TOML form (what the sample file shows); None: unset, the help says what happens then
    help: str
    flag: bool = True  # third-party plugin settings have no flag (TOML and environment only)
    field: str = ""  # AgentConfig field when it differs from name
    example: Any = None  # shown, commented out, in the sample file when there is no default

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def config_field(self) -> str:
        return self.field or self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("manifests", "agent", "manifests", PATH, "config/samples",
            "directory of Model and InferenceService manifests (standalone mode)"),
    Setting("poll_interval", "agent", "poll_interval", seconds(0, 3600), 1.0,
            "seconds between manifest directory scans"),
    Setting("manifest_max_size", "agent", "manifest_max_size", QUANTITY, "1Mi",
            "largest manifest file read; a larger one is reported as invalid and skipped"),
    Setting("state_dir", "agent", "state_dir", PATH, "~/.local/state/metal-agent",
            "server logs, the state file and the single-instance lock (made private: 0700)"),
    Setting("api_host", "api", "host", HOST, "127.0.0.1",
            "address of the local API; it has no authentication, keep it on loopback"),
    Setting("api_port", "api", "port", PORT, 9464,
            "port of the local API (/status, /metrics, /healthz, /readyz, the OpenAI-compatible /v1)"),
    Setting("memory_fraction", "memory", "fraction", FRACTION, None,
            "share of host memory for all models together (default: adaptive, 0.67 of RAM up to 36 GiB, 0.75 "
            "above)", example=0.75),
    Setting("memory_check_mode", "memory", "check_mode", enum_choice(Mode), "enforce",
            "enforce: a model that does not fit is not started; warn: it starts with a warning", field="mode"),
    Setting("budget_tolerance", "memory", "budget_tolerance", RATIO, 0.02,
            "share by which a running server's measured footprint may exceed its own budget (beyond: stopped in "
            "enforce mode, reason ExceedsBudget) and its reservation (beyond: an ExceedsReservation warning)"),
    Setting("host_memory", "memory", "host_memory", QUANTITY, None,
            "pretend the host has this much memory (default: detected; cgroup and GPU wired limits apply)",
            example="64Gi"),
    Setting("request_wait", "api", "request_wait", seconds(0, 3600), 120.0,
            "seconds a /v1 request waits for its unit to be ready (an on-demand unit's cold start) before a 503"),
    Setting("max_request_body", "api", "max_request_body", QUANTITY, "32Mi",
            "largest /v1 request body accepted (413 above)"),
    Setting("ports", "servers", "ports", PORTS, None,
            "serve models on ports from this range (default: kernel-assigned)", example="8100-8199"),
    Setting("server_host", "servers", "host", HOST, None,
            "address the inference servers listen on (default: 127.0.0.1; 0.0.0.0 in Kubernetes mode with "
            "endpoints, so that the cluster reaches them)", example="0.0.0.0"),
    Setting("startup_timeout", "servers", "startup_timeout", seconds(0), 120.0,
            "seconds a server may take to answer /health"),
    Setting("grace_period", "servers", "grace_period", seconds(0, 3600), 10.0,
            "seconds between SIGTERM and SIGKILL when a server is stopped"),
    Setting("probe_interval", "servers", "probe_interval", seconds(0, 3600), 5.0,
            "seconds between health probes of a running server"),
    Setting("unhealthy_after", "servers", "unhealthy_after", integer(1, 1000), 3,
            "failed health probes in a row before a server is restarted"),
    Setting("backoff_base", "servers", "backoff_base", seconds(0, 3600), 1.0,
            "first delay before restarting a crashed server (doubles each failure)"),
    Setting("backoff_cap", "servers", "backoff_cap", seconds(0), 60.0, "longest delay between restarts"),
    Setting("log_max_size", "servers", "log_max_size", QUANTITY, "8Mi",
            "a server's log file is rotated when it reaches this size, however fast the server writes"),
    Setting("log_keep", "servers", "log_keep", integer(1, 100), 2, "rotated log files kept per server (.1 ... .N)"),
    Setting("server_env", "servers", "env", string_list(_env_names, "list of variable names", "NAMES"), None,
            "environment variables passed to servers besides the allowlist (PATH, HOME, TMPDIR, LANG, LC_*, TZ, "
            "library paths, GPU selection); a trailing * matches a prefix", example=["LLAMA_ARG_*"]),
    Setting("crash_loop_after", "servers", "crash_loop_after", integer(1, 1000), 5,
            "failures without a healthy start before a unit shows CrashLoop"),
    Setting("pressure_warning", "pressure", "warning", FRACTION, 0.20,
            "share of memory available at or below which new units wait (reason MemoryPressure)"),
    Setting("pressure_critical", "pressure", "critical", FRACTION, 0.10,
            "share of memory available at or below which units are evicted (lowest priority, then largest first)"),
    Setting("pressure_hysteresis", "pressure", "hysteresis", RATIO, 0.05,
            "how far above a threshold available memory must climb before its level clears"),
    Setting("pressure_interval", "pressure", "interval", seconds(0, 3600), 2.0, "seconds between memory samples"),
    Setting("eviction", "pressure", "eviction", BOOLEAN, True,
            "evict units under critical pressure (--no-eviction: only hold new ones back)"),
    Setting("model_store", "models", "store", PATH, None,
            "where downloaded models are kept (default: $XDG_DATA_HOME/metal-agent/models, else "
            "~/.local/share/metal-agent/models)", example="~/models/store"),
    Setting("model_root", "models", "roots", PATHS, None,
            "directories local model files may lie in, besides the store and (standalone) the manifest directory; "
            "the flag may be repeated", example=["~/models"]),
    Setting("model_file_mode", "models", "file_mode", FILE_MODE, "0640",
            "permissions of downloaded model files (octal; their directories get the matching x bits)"),
    Setting("min_free_disk", "models", "min_free_disk", DISK_QUANTITY, "1Gi", "disk space a download must leave free"),
    Setting("kube", "kubernetes", "enabled", BOOLEAN, False,
            "take Models and InferenceServices from the Kubernetes API (list, then watch) instead of --manifests",
            field="kube_enabled"),
    Setting("kubeconfig", "kubernetes", "kubeconfig", PATH, None,
            "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else the in-cluster service account)",
            example="~/.kube/config"),
    Setting("context", "kubernetes", "context", text(lambda v, w: v, "context name", "NAME"), None,
            "kubeconfig context (default: its current context)", example="mac-cluster"),
    Setting("namespace", "kubernetes", "namespace", text(check_namespace, "namespace name", "NS"), None,
            "namespace to watch (default: the context's namespace, in a pod its own, else default)",
            example="llm"),
    Setting("all_namespaces", "kubernetes", "all_namespaces", BOOLEAN, False,
            "watch every namespace (needs cluster-wide RBAC); excludes --namespace"),
    Setting("label_selector", "kubernetes", "label_selector", text(check_label_selector, "label selector", "SEL"),
            None, "serve only InferenceServices matching it, e.g. node=mac-1", example="node=mac-1"),
    Setting("accelerators", "kubernetes", "accelerators",
            string_list(parse_accelerators, "list of accelerators", "LIST"), None,
            "accelerators this agent serves (default: metal,cpu on macOS; cuda where nvidia-smi sees a GPU; cpu "
            "otherwise)", example=["metal", "cpu"]),
    Setting("only", "kubernetes", "only", string_list(parse_only, "list of namespace/name", "NS/NAME"), None,
            "serve only these InferenceServices (several Macs sharing a cluster)", example=["default/qwen"]),
    Setting("agent_name", "kubernetes", "agent_name", HOST, None,
            "this agent in its objects' labels and in Events (default: the host name)", example="mac-studio-1"),
    Setting("advertise_address", "kubernetes", "advertise_address", IP_ADDRESS, None,
            "the IP address put in EndpointSlices, reachable from the cluster (default: this host's address on the "
            "route to the API server; no endpoint when that is loopback)",
            example="192.0.2.10"),
    Setting("endpoints", "kubernetes", "endpoints", BOOLEAN, True,
            "register a Service and an EndpointSlice for each served unit", field="register_endpoints"),
    Setting("service_port", "kubernetes", "service_port", PORT, 8080, "port of each unit's Service"),
    Setting("proxy_port", "kubernetes", "proxy_port", PORT, 9465,
            "port of the cluster-facing /v1 endpoint, on --server-host: an on-demand unit's EndpointSlice points "
            "at it, so that a request through its Service starts it (only /v1 is served there)"),
    # Their flags belong to every command (`metal-agent --log-level debug run`), so the table declares none.
    Setting("log_level", "log", "level", text_choice(logs.LEVELS), logs.DEFAULT_LEVEL,
            "debug, info, warning, error or critical; applies to library logs too", flag=False),
    Setting("log_format", "log", "format", text_choice(logs.FORMATS), logs.DEFAULT_FORMAT,
            "auto (console on a terminal, JSON lines otherwise), json or console", flag=False),
)  # fmt: skip

SECTION_TITLES = {
    "agent": "The agent: where it reads manifests and keeps its state.",
    "api": "The local HTTP API.",
    "memory": "The host memory budget for all models together.",
    "servers": "Inference servers: ports, start-up, health and restarts.",
    "pressure": "The memory-pressure watchdog: when new units wait, and when running ones are evicted.",
    "models": "Model files: the download store and the directories local models may come from.",
    "kubernetes": "Kubernetes mode: which cluster, which namespace and which objects this agent serves.",
    "log": "Logs, written to stderr (the --log-level and --log-format flags work on every command).",
}
