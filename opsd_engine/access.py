"""Who may read what: the deployment's allow-lists for dataset URIs and base models.

Owns the access policy of a multi-tenant service and its enforcement where a dataset is opened.
Dependency-free (standard library; ``aiohttp`` only when an http(s) dataset is opened), so the API
(no torch) checks a request with it and the engine's dataset reader enforces it at open time.

Policies are JSON objects mapping a tenant name (``"*"``: every tenant) to a list of entries:

* datasets (``OPSD_DATASET_URI_POLICY``): URI prefixes. ``/srv/data/`` or ``file:///srv/data/``
  is a local root (the root and every path checked are resolved with symlinks and ``..`` first);
  ``s3://bucket/prefix/`` (any fsspec scheme) an object-store prefix; ``https://host/prefix/``
  an http(s) prefix, whose host must resolve to public addresses only (never loopback, private,
  link-local, shared, multicast or cloud-metadata addresses), checked after DNS resolution on
  every connection, redirects included. A tenant's uploaded files (``file-...`` ids) are always
  allowed; with no policy they are the only datasets (the multi-tenant default).
* base models (``OPSD_BASE_MODEL_POLICY``): hub-id patterns (``Qwen/*``, shell-style) and local
  roots (absolute paths). Default: any well-formed hub id, no local path.

Chained URIs (``simplecache::…``), relative paths and ``..`` segments in remote URIs are never
allowed. :func:`enforcing` installs a :class:`DatasetGuard` for the current process (the worker
does so around a job); :func:`guard_for_open` is the hook the dataset reader calls, a no-op when
no guard is installed (``opsd train`` on one's own machine).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

ALL_TENANTS = "*"
FILE_ID = re.compile(r"file-[0-9a-z]{26}")
# Hugging Face repo ids: "name" or "org/name", letters, digits, "-", "_", "." (no "--"/"..").
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
HTTP_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("", "file")
MAX_TREE_ENTRIES = 100_000
# Addresses that serve cloud instance metadata and are not covered by the address classes.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)

Resolver = Callable[[str, int], list[str]]


class AccessDenied(ValueError):
    """A URI or model the policy does not allow; the message says why (never what exists)."""


# ------------------------------------------------------------------------------ addresses
def address_problem(address: str) -> str | None:
    """Why a connection to ``address`` (an IPv4/IPv6 literal) is refused, or None if public.

    Refused: loopback, private (RFC 1918, ULA), link-local (169.254/16, fe80::/10), shared
    (100.64/10), cloud metadata, multicast, unspecified, reserved and every other non-global
    address; IPv4-mapped, 6to4 and Teredo IPv6 addresses are judged by the IPv4 they carry.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_problem(str(embedded))
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for name, flag in (
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("an unspecified address", ip.is_unspecified),
        ("a multicast address", ip.is_multicast),
        ("a reserved address", ip.is_reserved),
        ("a private address", ip.is_private),
    ):
        if flag:
            return name
    if not ip.is_global:
        return "a non-public address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``socket.getaddrinfo``); OSError when it does not."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


# ---------------------------------------------------------------------------------- policy
def _split_local(uri: str) -> str | None:
    """The path of a local URI (``/x``, ``~/x``, ``file:///x``), or None for any other URI."""
    if uri.startswith("file://"):
        return uri[len("file://") :] or "/"
    if "://" in uri or "::" in uri:
        return None
    return uri


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _has_dot_segments(path: str) -> bool:
    return any(part in (".", "..") for part in path.split("/"))


@dataclass(frozen=True)
class Rules:
    """One tenant's allowed locations, parsed (local roots are resolved)."""

    local_roots: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()  # remote URI prefixes (object stores and http(s))
    hub_patterns: tuple[str, ...] = ()

    def allows_prefix(self, uri: str) -> bool:
        for prefix in self.prefixes:
            if uri == prefix or (
                uri.startswith(prefix)
                and (prefix.endswith(("/", "://")) or uri[len(prefix)] == "/")
            ):
                return True
        return False

    def allows_local(self, real_path: str) -> bool:
        return any(_under(real_path, root) for root in self.local_roots)


def _parse_mapping(text: str, what: str) -> dict[str, list[str]]:
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(e, str) and e for e in v)
        for k, v in data.items()
    ):
        raise ValueError(f'{what}: expected {{"tenant or *": ["entry", ...]}}')
    return data


@dataclass(frozen=True)
class AccessPolicy:
    """The deployment's dataset and base-model allow-lists, per tenant name.

    Build it with :meth:`parse`; ``private_hosts`` (``host:port``) are http(s) servers the
    operator trusts although they have non-public addresses (an internal dataset server).
    """

    datasets: Mapping[str, Rules] = field(default_factory=dict)
    base_models: Mapping[str, Rules] = field(default_factory=dict)
    private_hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls, datasets: str = "", base_models: str = "", private_hosts: str = ""
    ) -> AccessPolicy:
        """Parse the JSON of both policies (empty: the defaults); ValueError naming the problem.

        Defaults: datasets: uploaded files only; base models: any well-formed hub id.
        """
        dataset_rules: dict[str, Rules] = {}
        for tenant, entries in _parse_mapping(datasets, "dataset URI policy").items():
            roots, prefixes = [], []
            for entry in entries:
                local = _split_local(entry)
                if local is not None:
                    if not os.path.isabs(os.path.expanduser(local)):
                        raise ValueError(f"dataset URI policy: {entry!r} is not an absolute path")
                    roots.append(_real(local))
                elif "::" in entry or "://" not in entry:
                    raise ValueError(f"dataset URI policy: {entry!r} is not a URI prefix")
                elif _has_dot_segments(entry.split("://", 1)[1]):
                    raise ValueError(f"dataset URI policy: {entry!r} has '.' or '..' segments")
                else:
                    prefixes.append(entry)
            dataset_rules[tenant] = Rules(tuple(roots), tuple(prefixes))
        model_rules: dict[str, Rules] = {}
        for tenant, entries in _parse_mapping(base_models, "base model policy").items():
            roots, patterns = [], []
            for entry in entries:
                if entry.startswith(("/", "~", "file://")):
                    roots.append(_real(_split_local(entry) or entry))
                else:
                    patterns.append(entry)
            model_rules[tenant] = Rules(local_roots=tuple(roots), hub_patterns=tuple(patterns))
        if not base_models.strip():
            model_rules[ALL_TENANTS] = Rules(hub_patterns=("*",))
        hosts = frozenset(h.strip().lower() for h in private_hosts.split(",") if h.strip())
        return cls(dataset_rules, model_rules, hosts)

    def _rules(self, table: Mapping[str, Rules], tenant: str) -> Rules:
        parts = [table[name] for name in (ALL_TENANTS, tenant) if name in table]
        return Rules(
            tuple(r for p in parts for r in p.local_roots),
            tuple(r for p in parts for r in p.prefixes),
            tuple(r for p in parts for r in p.hub_patterns),
        )

    def dataset_rules(self, tenant: str) -> Rules:
        return self._rules(self.datasets, tenant)

    def describe_datasets(self, tenant: str) -> str:
        """What this tenant may name as a dataset, in words (for error messages)."""
        rules = self.dataset_rules(tenant)
        allowed = [*rules.local_roots, *rules.prefixes]
        others = f", or a location under {', '.join(allowed)}" if allowed else ""
        return f"an uploaded file id (file-...; POST /files){others}"

    # ----------------------------------------------------------------------------- datasets
    def check_dataset_uri(
        self, uri: str, tenant: str, *, resolve: Resolver | None = system_resolver
    ) -> str:
        """The kind of an allowed dataset URI: ``file``, ``local``, ``http`` or ``remote``.

        Raises :class:`AccessDenied` otherwise. Local paths are resolved (symlinks, ``..``) and
        must lie under a local root; http(s) hosts are resolved with ``resolve`` and every
        address must be public (pass ``resolve=None`` to skip the lookup). Never touches the
        data itself.
        """
        if FILE_ID.fullmatch(uri):
            return "file"
        if "::" in uri:
            raise AccessDenied("chained URIs ('::') are not allowed")
        rules = self.dataset_rules(tenant)
        local = _split_local(uri)
        if local is not None:
            if not os.path.isabs(os.path.expanduser(local)):
                raise AccessDenied(
                    f"{uri!r} is neither an uploaded file id nor an absolute path; "
                    f"allowed: {self.describe_datasets(tenant)}"
                )
            if not rules.allows_local(_real(local.split("#", 1)[0])):
                raise AccessDenied(f"not allowed; allowed: {self.describe_datasets(tenant)}")
            return "local"
        scheme, rest = uri.split("://", 1)
        if _has_dot_segments(urlsplit(uri).path if scheme in HTTP_SCHEMES else rest):
            raise AccessDenied("'.' and '..' segments are not allowed in a URI")
        if not rules.allows_prefix(uri):
            raise AccessDenied(f"not allowed; allowed: {self.describe_datasets(tenant)}")
        if scheme.lower() in HTTP_SCHEMES:
            if resolve is not None:
                self.check_http_host(uri, resolve)
            return "http"
        return "remote"

    def check_http_host(self, url: str, resolve: Resolver = system_resolver) -> None:
        """AccessDenied unless every address of the URL's host is public (or trusted)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            raise AccessDenied(f"{url!r} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if f"{host}:{port}" in self.private_hosts:
            return
        try:
            addresses = [host] if _is_ip(host) else resolve(host, port)
        except OSError:
            raise AccessDenied(f"host {host!r} does not resolve") from None
        for address in addresses:
            if (problem := address_problem(address)) is not None:
                raise AccessDenied(f"host {host!r} resolves to {problem}; refused")

    def allows_connection(self, host: str, address: str, port: int) -> str | None:
        """Why a socket to ``address:port`` (for ``host``) is refused, or None."""
        if f"{host.lower()}:{port}" in self.private_hosts:
            return None
        if f"{address}:{port}" in self.private_hosts:
            return None
        return address_problem(address)

    # -------------------------------------------------------------------------- base models
    def check_base_model(self, name: str, tenant: str) -> str:
        """``hub`` or ``local`` for an allowed base model; AccessDenied otherwise.

        A local path (absolute, ``~`` or ``file://``) must resolve under a local root; anything
        else must be a well-formed hub id matching one of the tenant's patterns.
        """
        rules = self._rules(self.base_models, tenant)
        if name.startswith(("/", "~", "file://", ".")):
            real = _real(_split_local(name) or name)
            if rules.allows_local(real):
                return "local"
            roots = ", ".join(rules.local_roots) or "none"
            raise AccessDenied(f"local base models are allowed only under: {roots}")
        if not HUB_ID.fullmatch(name) or "--" in name or ".." in name:
            raise AccessDenied(f"{name!r} is not a hub id (org/name) or an absolute path")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in rules.hub_patterns):
            return "hub"
        patterns = ", ".join(rules.hub_patterns) or "none"
        raise AccessDenied(f"hub model {name!r} is not allowed (allowed: {patterns})")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- enforcement
@dataclass
class DatasetGuard:
    """The policy of one tenant, applied where a dataset is opened (in the worker).

    ``files`` maps an uploaded file id of this tenant to where it is stored (None: no such
    file). ``names`` remembers the stored location of each file id opened, so error messages can
    show the id instead of the storage path (:meth:`public_text`).
    """

    policy: AccessPolicy
    tenant: str
    files: Callable[[str], str | None]
    names: dict[str, str] = field(default_factory=dict)

    def for_open(
        self, uri: str, storage_options: Mapping[str, Any] | None
    ) -> tuple[str, dict[str, Any]]:
        """The URI to open instead of ``uri`` and the storage options to open it with.

        File ids become their stored location; local paths their resolved path, after checking
        that it, and every file under it, lies under an allowed root; http(s) URIs get a client
        that refuses non-public addresses on every connection and URLs outside the policy on
        redirects. AccessDenied for anything else.
        """
        options = dict(storage_options or {})
        kind = self.policy.check_dataset_uri(uri, self.tenant)
        if kind == "file":
            location = self.files(uri)
            if location is None:
                raise AccessDenied(f"no uploaded file {uri!r}")
            self.names[location] = uri
            return location, options
        if kind == "local":
            real = _real(_split_local(uri) or uri)
            self._check_tree(real)
            return real, options
        if kind == "http":
            options["get_client"] = self._http_client_factory()
        return uri, options

    def _check_tree(self, real: str) -> None:
        rules = self.policy.dataset_rules(self.tenant)
        if not os.path.isdir(real):
            return
        seen = 0
        for folder, dirs, files in os.walk(real):
            for name in [*dirs, *files]:
                seen += 1
                if seen > MAX_TREE_ENTRIES:
                    raise AccessDenied(
                        f"a dataset folder may hold at most {MAX_TREE_ENTRIES} entries"
                    )
                if not rules.allows_local(os.path.realpath(os.path.join(folder, name))):
                    raise AccessDenied("the dataset folder links to a location outside the policy")

    def _http_client_factory(self) -> Callable[..., Any]:
        policy, rules = self.policy, self.policy.dataset_rules(self.tenant)

        async def get_client(**kwargs: Any) -> Any:
            import aiohttp

            def socket_factory(addr_info: Any) -> socket.socket:
                family, kind, proto, _, sockaddr = addr_info
                problem = address_problem(sockaddr[0])
                if problem is not None and not any(
                    h.endswith(f":{sockaddr[1]}") and h.rsplit(":", 1)[0] == sockaddr[0]
                    for h in policy.private_hosts
                ):
                    raise AccessDenied(f"refused a connection to {problem}")
                return socket.socket(family, kind, proto)

            async def on_start(_s: Any, _c: Any, params: Any) -> None:
                _check_url(str(params.url))

            async def on_redirect(_s: Any, _c: Any, params: Any) -> None:
                location = params.response.headers.get("Location", "")
                _check_url(urljoin(str(params.url), location))

            def _check_url(url: str) -> None:
                if urlsplit(url).scheme.lower() not in HTTP_SCHEMES or not rules.allows_prefix(url):
                    raise AccessDenied("a request (or redirect) left the allowed URL prefixes")
                host = (urlsplit(url).hostname or "").lower()
                port = urlsplit(url).port or (443 if url.lower().startswith("https") else 80)
                if _is_ip(host) and policy.allows_connection(host, host, port) is not None:
                    raise AccessDenied(f"refused a connection to {address_problem(host)}")

            trace = aiohttp.TraceConfig()
            trace.on_request_start.append(on_start)
            trace.on_request_redirect.append(on_redirect)
            connector = aiohttp.TCPConnector(socket_factory=socket_factory)
            return aiohttp.ClientSession(connector=connector, trace_configs=[trace], **kwargs)

        return get_client

    def public_text(self, text: str) -> str:
        """``text`` with the stored location of every file opened replaced by its file id."""
        for location, file_id in self.names.items():
            text = text.replace(location, file_id)
        return text


_active: ContextVar[DatasetGuard | None] = ContextVar("opsd_dataset_guard", default=None)


@contextmanager
def enforcing(guard: DatasetGuard) -> Iterator[DatasetGuard]:
    """Apply ``guard`` to every dataset opened in this context (thread) until the block ends.

    A context variable, not a process global: an API thread validating an upload in the same
    process as a running job is not subject to that job's tenant's policy.
    """
    token = _active.set(guard)
    try:
        yield guard
    finally:
        _active.reset(token)


def guard_for_open(
    uri: str, storage_options: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any] | None]:
    """The dataset reader's hook: ``(uri, storage_options)`` as the active guard allows them.

    Without a guard (local use of the engine) both come back unchanged. AccessDenied when the
    guard refuses.
    """
    guard = _active.get()
    if guard is None:
        return uri, dict(storage_options) if storage_options is not None else None
    return guard.for_open(uri, storage_options)
