"""Where a Model's files are: remote sources mapped into the model store, local paths confined to allowed roots.

A Model manifest may come from anyone who can write to the manifest directory or the cluster, so a source must
never make the agent read an arbitrary file of the host: a local path (after ``..`` and every symlink are
resolved) must lie inside the model store or a configured model root. Remote files land in the store under a
directory named after their URL, so two Models with the same source share one file and one download.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from agent.sources.manifest import ModelSpec
from agent.util.redact import canonical as canonical  # re-exported: downloads key their partial files on it
from agent.util.redact import quoted, redact_url

redact = redact_url  # the old name, kept for callers: a URL fit for messages and logs
HF_ENDPOINT = "https://huggingface.co"
HF_TOKEN_ENV = "HF_TOKEN"
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_SHARDS = 1000


def default_model_store() -> Path:
    """Models are large user data that outlive the agent's state: the XDG data directory, not the state dir."""
    data_home = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data_home).expanduser() / "metal-agent" / "models"


class SourceError(ValueError):
    """A source the agent will not use; ``reason`` is the unit's status reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RemoteFile:
    url: str
    path: Path  # where it is stored once downloaded


@dataclass(frozen=True)
class ModelFiles:
    """A Model's file (its first shard for a split model) and, for remote sources, every file to download."""

    path: Path
    remote: tuple[RemoteFile, ...] = ()

    def downloaded(self) -> bool:
        return all(f.path.is_file() for f in self.remote)


def hf_url(source: str, endpoint: str = HF_ENDPOINT) -> str:
    """``hf://org/repo[@revision]/path/file.gguf`` → the Hugging Face resolve URL of that file."""
    rest = source.removeprefix("hf://")
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise SourceError("InvalidSource", f"source {quoted(source)}: expected hf://ORG/REPO[@REVISION]/PATH/FILE")
    org, repo, path = parts[0], parts[1], "/".join(parts[2:])
    repo, _, revision = repo.partition("@")
    if ".." in parts or not repo:
        raise SourceError("InvalidSource", f"source {quoted(source)}: expected hf://ORG/REPO[@REVISION]/PATH/FILE")
    return f"{endpoint}/{org}/{repo}/resolve/{quote(revision or 'main', safe='')}/{path}"


def remote_url(source: str) -> str | None:
    """The http(s) URL of a remote source, or None for a local one; other schemes are refused."""
    if source.startswith("hf://"):
        return hf_url(source)
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        if not parsed.hostname:
            raise SourceError("InvalidSource", f"source {quoted(source)} has no host")
        if parsed.scheme == "http" and (parsed.username or parsed.password) and not _loopback(parsed.hostname):
            raise SourceError(
                "InvalidSource",
                f"source {quoted(source)}: a user or password in an http:// URL would cross the network in clear "
                "text; use https://",
            )
        return source
    if parsed.scheme and len(parsed.scheme) > 1 and parsed.scheme != "file":
        raise SourceError(
            "UnsupportedSource",
            f"source {quoted(source)}: scheme {parsed.scheme[:20]}:// is not supported (http, https, hf)",
        )
    return None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shard_urls(url: str) -> list[str]:
    """Every shard of a split GGUF (``name-00001-of-0000N.gguf``); just ``url`` for a single file."""
    base, _, name = url.rpartition("/")
    match = _SHARD.match(unquote(name.split("?")[0]))
    if match is None:
        return [url]
    count = int(match["count"])
    if int(match["no"]) != 1:
        raise SourceError("InvalidSource", f"source {quoted(url)} is shard {int(match['no'])}; name the first shard")
    if not 1 <= count <= MAX_SHARDS:
        raise SourceError("InvalidSource", f"source {quoted(url)} claims {count} shards")
    return [f"{base}/{quote(match['prefix'])}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def auth_headers(url: str) -> dict[str, str]:
    """``HF_TOKEN`` for Hugging Face over https only: never in clear text, never to another host or port (than
    ``HF_ENDPOINT``'s).

    A manifest naming another host (``huggingface.co.evil.example``, ``http://huggingface.co:8080``) never
    receives it; aiohttp drops the header when a redirect leaves the origin (the CDN).
    """
    token = os.environ.get(HF_TOKEN_ENV)
    if not token:
        return {}
    endpoint, parts = urlparse(HF_ENDPOINT), urlparse(url)
    try:
        port = 443 if parts.port is None else parts.port
    except ValueError:
        return {}
    if parts.scheme != "https" or parts.hostname != endpoint.hostname or port != (endpoint.port or 443):
        return {}
    return {"Authorization": f"Bearer {token}"}


def store_dir(store: Path, url: str) -> Path:
    """A directory per remote folder: readable (the host) and unique (a hash of the URL without its file name).

    The query is left out, so a signed URL whose signature changed still finds its partial file.
    """
    parsed = urlparse(url)
    host = re.sub(r"[^A-Za-z0-9._-]", "_", parsed.hostname or "") or "host"
    host += f"_{parsed.port}" if parsed.port else ""
    folder = canonical(url).rsplit("/", 1)[0]
    return store / f"{host}-{hashlib.sha256(folder.encode()).hexdigest()[:12]}"


def file_name(url: str) -> str:
    name = unquote(urlparse(url).path.rsplit("/", 1)[-1])
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise SourceError("InvalidSource", f"source {quoted(url)} does not end in a file name")
    return name


def remote_files(url: str, store: Path) -> ModelFiles:
    directory = store_dir(store, url)
    files = tuple(RemoteFile(u, directory / file_name(u)) for u in shard_urls(url))
    return ModelFiles(files[0].path, files)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine(path: Path, roots: Sequence[Path], source: str) -> Path:
    """The real path of ``path`` if it (and every shard of a split model) lies in one of ``roots``."""
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    candidates = [path]
    match = _SHARD.match(path.name)
    if match and int(match["count"]) > 1:
        count = min(int(match["count"]), MAX_SHARDS)
        candidates += [
            path.with_name(f"{match['prefix']}-{i:05d}-of-{match['count']}.gguf") for i in range(2, count + 1)
        ]
    real_first = Path(os.path.realpath(path))
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not any(_inside(real, root) for root in real_roots):
            via = f" (through a symlink to {real})" if real != Path(os.path.abspath(candidate)) else ""
            allowed = ", ".join(str(r) for r in real_roots) or "none configured"
            raise SourceError(
                "SourceNotAllowed",
                f"source {quoted(source)}: {candidate}{via} is outside the model store and the model roots "
                f"({allowed}); move the model there or add its directory with --model-root",
            )
    return real_first


def model_files(model: ModelSpec, store: Path, roots: Sequence[Path]) -> ModelFiles:
    """The files of a Model: remote sources in the store, local ones confined to the store and ``roots``."""
    url = remote_url(model.source)
    if url is not None and model.format != "gguf":
        raise SourceError(
            "UnsupportedSource",
            f"source {quoted(model.source)}: only GGUF files are downloaded; fetch this {model.format} model yourself "
            "and give its local path",
        )
    if url is not None:
        return remote_files(url, store)
    local = model.local_path()
    if local is None:  # not reached: remote_url refuses every non-local scheme
        raise SourceError("UnsupportedSource", f"source {quoted(model.source)} is not local")
    return ModelFiles(confine(Path(os.path.abspath(local)), [store, *roots], model.source))
