"""Kubernetes mode: the agent as a member of a cluster (watch, status, Events, endpoints, deploy)."""
