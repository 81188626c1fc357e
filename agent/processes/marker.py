"""The mark every server carries in its environment, so the agent finds its own servers without the state file.

The state file can be torn, missing or hand-edited, and a wrapper that ``exec``s the real server changes its
command line; the process table stays. Each child starts with ``METAL_AGENT_STATE_ID`` (derived from the user
and the resolved state directory: one id per agent installation, the same across restarts) and the unit, spec,
port and health path it serves. The OS keeps a process's initial environment across ``exec`` and lets its
owner read it back (psutil ``Process.environ()`` on Linux and macOS); other users' processes cannot be read,
and so are never taken for ours.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import psutil

STATE_ID = "METAL_AGENT_STATE_ID"
UNIT = "METAL_AGENT_UNIT"
SPEC_HASH = "METAL_AGENT_SPEC_HASH"
PORT = "METAL_AGENT_PORT"
HEALTH_PATH = "METAL_AGENT_HEALTH_PATH"
NAMES = frozenset({STATE_ID, UNIT, SPEC_HASH, PORT, HEALTH_PATH})  # not settings: config must not refuse them


def state_id(state_dir: Path) -> str:
    """This agent's id: the same for every agent run on this state directory by this user."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return hashlib.sha256(f"metal-agent:{uid}:{state_dir.expanduser().resolve()}".encode()).hexdigest()[:20]


def child_env(state: str, unit: str, spec_hash: str, port: int, health_path: str) -> dict[str, str]:
    return {STATE_ID: state, UNIT: unit, SPEC_HASH: spec_hash, PORT: str(port), HEALTH_PATH: health_path}


def read(process: psutil.Process, state: str) -> Mapping[str, str] | None:
    """The process's environment when it carries this agent's mark; None otherwise (or when it cannot be read)."""
    try:
        env = process.environ()
    except (psutil.Error, OSError):
        return None
    return env if env.get(STATE_ID) == state else None


def carries(process: psutil.Process, state: str, unit: str) -> bool:
    """Whether the process was started by this agent for ``unit``: proof of ownership beside pid and create time."""
    env = read(process, state)
    return env is not None and env.get(UNIT) == unit
