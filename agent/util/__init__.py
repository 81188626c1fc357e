"""Utilities every layer may use and that use nothing of the agent: safe file reads and writes, redaction of
user input in messages, logging setup, Kubernetes quantities and durations.
"""
