"""Configuration: every setting declared once, and the effective configuration resolved from them.

The settings table (TOML key, flag, environment variable, type, default, check and help), loading with precedence
defaults < TOML < environment < flags, the generated sample file, and the resolved ``AgentConfig``.
"""
