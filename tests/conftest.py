"""Shared fixtures: `kube_api`, the fake Kubernetes API server (tests/kubeapi.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubeapi import KubeAPI


@pytest.fixture
def kube_api() -> Iterator[KubeAPI]:
    with KubeAPI() as api:
        yield api
