"""The agent's configuration: what ``metal-agent run`` resolved from flags, environment, TOML and defaults.

Its fields mirror the settings table (agent/config/settings.py) where a setting's name matches; the run command
builds it (agent/cli/cmd_run.py), and tests and benchmarks build it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config.kube_settings import KubeSettings
from agent.estimate.preflight import Mode
from agent.memory.pressure import Thresholds, check_interval


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    memory_fraction: float | None = None
    mode: Mode = Mode.ENFORCE
    host_memory: int | None = None  # override of the detected total
    budget_tolerance: float = 0.02  # beyond this share over its budget: stopped (enforce); over its reservation: warned
    startup_timeout: float = 120.0
    grace_period: float = 10.0
    probe_interval: float = 5.0
    unhealthy_after: int = 3  # failed probes in a row before a restart
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    crash_loop_after: int = 5  # failures without a healthy start in between
    log_max_size: int = 8 << 20  # a server's log is rotated at this size (agent/processes/logwriter.py)
    log_keep: int = 2  # rotated logs kept per server
    server_env: tuple[str, ...] | None = (
        None  # variables servers get besides the allowlist (agent/processes/server_env.py)
    )
    ports: range | None = None  # fixed ports for servers (firewall rules, bookmarks); None: kernel-assigned
    kube: KubeSettings | None = None  # Kubernetes mode (run --kube): objects come from the API server
    model_store: Path | None = None  # downloads; None: STATE_DIR/models
    model_roots: tuple[Path, ...] = ()  # directories local model paths may lie in (besides the store)
    min_free_disk: int = 1 << 30  # a download must leave this much disk free
    model_file_mode: int = 0o640  # permissions of downloaded model files
    # Kubernetes mode (agent/kube/report.py): how this host appears in the cluster.
    agent_name: str | None = None  # host label, Events' reportingInstance; None: the host name
    advertise_address: str | None = None  # the IP in EndpointSlices; None: the route to the API server
    register_endpoints: bool = True  # a Service and an EndpointSlice per served unit
    service_port: int = 8080
    proxy_port: int = 9465  # the cluster-facing /v1 listener (agent/service/api.py) on-demand Services point at
    pressure_warning: float = 0.20  # available fraction at or below which admissions wait
    pressure_critical: float = 0.10  # available fraction at or below which units are evicted
    pressure_hysteresis: float = 0.05  # margin above a threshold before its level is left
    pressure_interval: float = 2.0  # seconds between memory samples
    eviction: bool = True  # evict units under critical pressure (False: only block admissions)
    # The /v1 endpoint (agent/service/proxy.py): how long a request waits for its unit, how large its body may be.
    request_wait: float = 120.0
    max_request_body: int = 32 << 20

    def __post_init__(self) -> None:  # invalid pressure settings fail here (InvalidValue), not in the watchdog
        self.thresholds()
        check_interval(self.pressure_interval)

    def thresholds(self) -> Thresholds:
        return Thresholds(self.pressure_warning, self.pressure_critical, self.pressure_hysteresis)
