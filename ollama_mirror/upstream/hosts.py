"""Several upstream registries, each serving one model host, and which one a request means.

``registry.ollama.ai`` (or whatever ``upstream.host`` says) is the default; ``upstream.hosts`` adds
others (``hf.co``, a private registry).  The Ollama API picks one by the model name's host; the
``/v2`` routes by the request's ``Host`` (a virtual host such as ``hf.mirror.example`` → ``hf.co``,
or the model host itself in transparent mode), else the default.

Every upstream request carries the mirror's ``Via`` marker (:func:`ollama_mirror.cache.files.cache_marker`),
so that a request that comes back is seen as a loop (:mod:`ollama_mirror.web.loop`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from ..config import Config, UpstreamHost
from ..runner import Reactor
from .client import Upstream
from .retry import RetryPolicy
from .trust import UpstreamEndpoints, client_policy

log = Logger(namespace="ollama_mirror.upstreams")  # pinned: log names are public


class Upstreams:
    """Every configured :class:`Upstream` by model host, the default first."""

    def __init__(self, upstreams: list[Upstream], virtual_hosts: Mapping[str, str] | None = None) -> None:
        self.default = upstreams[0]
        self._by_host = {u.host.lower(): u for u in upstreams}
        self._virtual = {k.lower(): v.lower() for k, v in (virtual_hosts or {}).items()}

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_host.values())

    def for_model_host(self, host: str) -> Upstream | None:
        """The upstream serving models named ``host/...``, if one is configured."""
        return self._by_host.get(host.lower())

    def for_request_host(self, header: str | None) -> Upstream:
        """The upstream a ``/v2`` request means by its ``Host``: a virtual host, a model host, else the
        default.  ``host:port`` is tried before the bare host."""
        if not header:
            return self.default
        full = header.strip().lower()
        bare = full.rsplit(":", 1)[0] if full.count(":") == 1 or full.startswith("[") else full
        for name in (full, bare):
            target = self._virtual.get(name)
            if target is not None:
                return self._by_host[target]
            found = self._by_host.get(name)
            if found is not None:
                return found
        return self.default


def build_upstreams(
    config: Config,
    reactor: Reactor,
    marker: str,
    agent: IAgent | None = None,
    retry: RetryPolicy | None = None,
    retried: Callable[[str], None] | None = None,
) -> tuple[Upstreams, list[HTTPConnectionPool]]:
    """The upstreams of *config*, each with an Agent of its own (TLS trust, address override, pool),
    or all on *agent* when one is given (tests, embedders); every request under *retry* (by default
    ``upstream.retry_attempts`` and ``retry_delay``), and *retried* hears each retried failure's kind."""
    retry = retry or RetryPolicy(reactor, config.upstream.retry_attempts, config.upstream.retry_delay)
    pools: list[HTTPConnectionPool] = []
    built = []
    for index, spec in enumerate(config.upstreams()):
        timeout = spec.timeout if spec.timeout is not None else config.upstream.timeout
        upstream_agent = agent
        if upstream_agent is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = (
                max(config.upstream.connections_per_blob, config.upstream.max_connections_per_blob)
                * config.upstream.max_concurrent_downloads
            )
            pool.retryAutomatically = False
            pools.append(pool)
            where = "upstream.ca_bundle" if index == 0 else f"upstream.hosts: {spec.host}: ca_bundle"
            upstream_agent = _agent(reactor, spec, pool, min(30.0, timeout), where)
        _log_trust(spec)
        built.append(
            Upstream(
                spec.url,
                spec.host,
                upstream_agent,
                reactor,
                timeout=timeout,
                username=spec.username,
                password=spec.password,
                token=spec.token,
                via=marker,
                retry=retry,
                retried=retried,
            )
        )
    return Upstreams(built, dict(config.server.virtual_hosts)), pools


def _agent(
    reactor: Reactor, spec: UpstreamHost, pool: HTTPConnectionPool, connect_timeout: float, where: str
) -> IAgent:
    policy = client_policy(spec.ca_bundle, spec.insecure, where)
    url_host = urlsplit(spec.url).hostname or ""
    endpoints = UpstreamEndpoints(reactor, policy, url_host, spec.address, connect_timeout)
    agent: IAgent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return agent


def _log_trust(spec: UpstreamHost) -> None:
    if spec.insecure and spec.url.startswith("https:"):
        log.warn(
            "TLS VERIFICATION IS OFF for upstream {host} ({url}): anyone on the network path can impersonate "
            "it and serve altered models. Remove insecure: true once its certificate can be verified "
            "(ca_bundle).",
            host=spec.host,
            url=spec.url,
        )
    elif spec.ca_bundle:
        log.info(
            "upstream {host} ({url}): trusting only the CAs in {bundle}",
            host=spec.host,
            url=spec.url,
            bundle=spec.ca_bundle,
        )
    if spec.address:
        log.info(
            "upstream {host}: connecting to {address} for {url} (TLS name and Host stay the URL's)",
            host=spec.host,
            address=spec.address,
            url=spec.url,
        )
