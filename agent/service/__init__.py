"""Service: the agent's local HTTP API.

Liveness, readiness, status as JSON, Prometheus metrics and the OpenAI-compatible endpoint that proxies to the
serving units. It reads the engine (its metrics registry included); nothing below it imports it.
"""
