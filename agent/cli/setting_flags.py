"""The settings that have command-line flags: the agent's and the built-in plugins'.

It lives with the commands, not with the settings table (``agent.config``), because finding the built-in plugins'
settings loads the plugin machinery (``agent.engine``), a layer above the configuration; only the commands that
take setting flags (``run``, ``config show``) pay for it.
"""

from __future__ import annotations

from agent.config.loading import all_settings
from agent.config.settings import Setting
from agent.engine.plugin_manager import load_plugins


def flag_settings() -> list[Setting]:
    """The agent's settings and the built-in plugins' (settings of third-party plugins have no flags)."""
    return all_settings(load_plugins(entry_points=False))
