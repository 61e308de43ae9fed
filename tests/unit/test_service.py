"""The service tree on a fake reactor: what listens where, and a clean stop."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from ollama_mirror.config import ConfigError, load_config
from ollama_mirror.daemon.service import StartupError, build_service
from ollama_mirror.runner import InlineRunner


def config_for(tmp_path: Path, **overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, {}, {"cache.directory": str(tmp_path / "cache"), **overrides})


def test_service_tree_listens_where_configured_and_stops(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    service = build_service(
        config_for(tmp_path, **{"server.port": "11434", "server.host": "127.0.0.1"}), reactor
    )
    service.privilegedStartService()
    service.startService()
    assert [(port, interface) for port, _factory, _backlog, interface in reactor.tcpServers] == [
        (11434, "127.0.0.1")
    ]
    assert (tmp_path / "cache" / "blobs").is_dir() and (tmp_path / "cache" / "manifests").is_dir()
    stopped = service.stopService()
    reactor.advance(1)
    assert stopped.called


def test_several_endpoints_including_unix(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    sock = str(tmp_path / "m.sock")
    service = build_service(config_for(tmp_path, **{"server.listen": f"tcp:8080,unix:{sock}"}), reactor)
    service.privilegedStartService()
    service.startService()
    assert [s[0] for s in reactor.tcpServers] == [8080]
    assert [s[0] for s in reactor.unixServers] == [sock]
    service.stopService()


def test_a_bad_endpoint_string_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.listen: cannot use endpoint 'bogus:1'"):
        build_service(config_for(tmp_path, **{"server.listen": "bogus:1"}), MemoryReactorClock())


def test_a_taken_port_stops_start_up_with_a_readable_error(tmp_path: Path) -> None:
    from twisted.internet import reactor

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        config = config_for(tmp_path, **{"server.port": str(port), "server.host": "127.0.0.1"})
        service = build_service(config, reactor)
        with pytest.raises(
            StartupError, match=rf"cannot listen on 127.0.0.1:{port}: .*[Aa]ddress already in use"
        ):
            service.privilegedStartService()
    finally:
        taken.close()


def test_embedders_can_inject_the_http_client_and_runner(tmp_path: Path) -> None:
    from treq.testing import RequestTraversalAgent
    from twisted.web.resource import Resource

    runner = InlineRunner()
    agent = RequestTraversalAgent(Resource())
    service = build_service(config_for(tmp_path), MemoryReactorClock(), agent=agent, runner=runner)
    assert service.mirror.runner is runner
    assert service.mirror.upstream.agent is agent


def test_a_worker_leaves_an_inherited_unix_socket_file_as_the_supervisor_made_it(tmp_path: Path) -> None:
    """Its mode stays (no chmod at all: not 0666 over ``mode=``, nor a chmod a worker running as
    another user may not make), and a worker stopping does not remove it."""
    from twisted.internet import reactor
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from ollama_mirror.daemon.service import AdoptedPortService

    path = str(tmp_path / "mirror.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(5)
    listener.setblocking(False)
    os.chmod(path, 0o660)  # the endpoint's mode=660, applied by the supervisor

    def no_chmod(*args: object) -> None:  # a worker under twistd --uid may not chmod the root-owned file
        raise PermissionError(1, "Operation not permitted")

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "chmod", no_chmod)
            service = AdoptedPortService(reactor, os.dup(listener.fileno()), socket.AF_UNIX, Site(Resource()))
            service.startService()
        port: Any = service._port
        assert port.connected
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o660)
        port.stopReading()
        port.connectionLost(Failure(ConnectionDone()))  # what stopListening leads to
        assert os.path.exists(path)  # the other workers and the supervisor still listen on it
    finally:
        listener.close()
