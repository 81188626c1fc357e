"""Which Service an HTTP Host names: what cluster DNS gives a client, and what must never pass for a Service."""

from __future__ import annotations

import pytest

from agent.util.kube_names import service_in_host, service_name


@pytest.mark.parametrize(
    ("host", "found"),
    [
        ("chat.llm.svc.cluster.local:8080", ("chat", "llm")),
        ("chat.llm.svc.cluster.local.", ("chat", "llm")),  # a fully qualified name with its root dot
        ("chat.llm.svc.k8s.example:80", ("chat", "llm")),  # another cluster domain
        ("chat.llm.svc", ("chat", "llm")),
        ("chat.llm:8080", ("chat", "llm")),  # the search path's short form
        ("Chat.LLM.SVC", ("chat", "llm")),  # DNS is case-insensitive
        ("chat", ("chat", None)),  # from a pod in the same namespace: any namespace may have it
        ("chat:8080", ("chat", None)),
        ("chat.1ns.svc", ("chat", "1ns")),  # a namespace may start with a digit, a Service may not
    ],
)
def test_cluster_dns_names_give_the_service_and_namespace(host: str, found: tuple[str, str | None]) -> None:
    assert service_in_host(host) == found


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "10.96.0.12",
        "10.96.0.12:8080",  # the ClusterIP or an address: the body's model decides
        "[fd00::12]:8080",
        "fd00::12",
        "localhost",
        "localhost:9464",
        "chat.llm.example.com",  # a name outside cluster DNS
        "chat.llm.svc@evil",
        "chat llm",
        "chat_x.llm.svc",
        "-chat.llm.svc",
        "chat..svc",
        "9chat.llm.svc",
        "a" * 64 + ".llm.svc",  # longer than a DNS label
        "chat.llm.svc:8080:9",
    ],
)
def test_addresses_and_malformed_hosts_name_no_service(host: str | None) -> None:
    assert service_in_host(host) is None


def test_a_unit_name_that_is_not_a_service_name_is_found_under_the_name_its_service_got() -> None:
    derived = service_name("qwen2.5-7b")  # an InferenceService name may hold dots; a Service name may not
    assert derived != "qwen2.5-7b" and service_in_host(f"{derived}.llm.svc:8080") == (derived, "llm")
