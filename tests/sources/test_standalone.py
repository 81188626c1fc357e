"""The manifest directory source: events from file changes, bad files reported, last good objects kept."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from agent.sources.manifest import ModelSpec, ServiceSpec
from agent.sources.standalone import Event, EventType, diff, read_directory, watch

API = "apiVersion: inference.llmkube.dev/v1alpha1"


def model_yaml(name: str, budget: str = "1Gi") -> str:
    spec = f"{{source: /m/{name}.gguf, hardware: {{memoryBudget: '{budget}'}}}}"
    return f"{API}\nkind: Model\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def test_diff_reports_added_modified_deleted_and_ignores_unchanged_specs() -> None:
    a = ModelSpec(name="a", namespace="d", source="/a", generation=1)
    b = ModelSpec(name="b", namespace="d", source="/b")
    old = {("ModelSpec", "d", "a"): a, ("ModelSpec", "d", "b"): b}
    a_status_only = ModelSpec(name="a", namespace="d", source="/a", generation=2, origin="elsewhere.yaml")
    c = ServiceSpec(name="c", namespace="d", model_ref="a")
    b_changed = ModelSpec(name="b", namespace="d", source="/b", memory_budget="2Gi")
    new = {("ModelSpec", "d", "a"): a_status_only, ("ModelSpec", "d", "b"): b_changed, ("ServiceSpec", "d", "c"): c}
    assert diff(old, new) == [Event(EventType.MODIFIED, b_changed), Event(EventType.ADDED, c)]
    assert diff(new, {}) == [Event(EventType.DELETED, o) for o in new.values()]


def test_read_directory_keeps_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(model_yaml("good"))
    (tmp_path / "bad.yml").write_text(model_yaml("bad", budget="-1Gi"))
    (tmp_path / "notes.txt").write_text("ignored")
    objects, errors = read_directory(tmp_path)
    assert list(objects) == [("ModelSpec", "default", "good")]
    assert list(errors) == [str(tmp_path / "bad.yml")] and "memoryBudget" in errors[str(tmp_path / "bad.yml")]


@pytest.mark.anyio
async def test_watch_follows_edits_and_keeps_last_good_objects_of_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(model_yaml("m"))
    errors: list[dict[str, str]] = []
    synced: list[bool] = []
    events = watch(tmp_path, 0.01, errors.append, lambda: synced.append(True))
    with anyio.fail_after(10):
        first = await events.__anext__()
        assert first.type is EventType.ADDED and synced == []  # told once the whole first listing is consumed
        path.write_text(model_yaml("m", budget="2Gi") + "\n")
        second = await events.__anext__()
        assert second.type is EventType.MODIFIED and isinstance(second.obj, ModelSpec)
        assert second.obj.memory_budget == "2Gi" and synced == [True]
        path.write_text("kind: [unclosed\n")  # broken: reported, and the model is not deleted
        (tmp_path / "other.yaml").write_text(model_yaml("other"))
        third = await events.__anext__()
        assert third.type is EventType.ADDED and third.obj.name == "other"
        assert str(path) in errors[-1]
        path.unlink()
        fourth = await events.__anext__()
        assert fourth.type is EventType.DELETED and fourth.obj.name == "m"
    await events.aclose()  # type: ignore[attr-defined]
