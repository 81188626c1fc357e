"""Executor plugins shipped with metal-agent."""
