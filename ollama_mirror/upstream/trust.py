"""TLS towards upstreams: whose certificates are trusted, and where connections go.

Certificates are verified (service-identity checks the name) against the system's CAs or an upstream's
own CA bundle; ``insecure`` turns that off for one upstream, loudly.  The connection may go to an address
other than the URL's host (transparent mode) while the TLS name and ``Host`` stay the URL's.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from ..config import ConfigError, parse_address
from ..runner import Reactor


def read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None


def read_certificates(path: str, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; a file with none is an error."""
    try:
        return x509.load_pem_x509_certificates(read_pem(path, what))
    except ValueError as e:
        raise ConfigError(f"{what}: {path} holds no readable PEM certificate ({e})") from None


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A TLS client that sends the name (SNI) but checks nothing: ``insecure: true``."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self._context = context
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)  # Twisted sets the client state and app data
        if not _is_ip(self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


@implementer(IPolicyForHTTPS)
class InsecurePolicy:
    def __init__(self) -> None:
        self._context = CertificateOptions(verify=False).getContext()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _Unverified(self._context, hostname.decode("ascii"))


def client_policy(ca_bundle: str, insecure: bool, what: str) -> IPolicyForHTTPS:
    """How an upstream's certificates are checked: by the system's CAs, by *ca_bundle*'s, or not at all."""
    if insecure:
        return InsecurePolicy()
    if ca_bundle:
        roots = [Certificate(X509.from_cryptography(c)) for c in read_certificates(ca_bundle, what)]
        return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(roots))
    return BrowserLikePolicyForHTTPS()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """Endpoints for an upstream's Agent: TLS by *policy*, and the URL's host replaced by *address*
    (``host:port``) when one is set.  The TLS name checked and the ``Host`` sent stay the URL's."""

    def __init__(
        self, reactor: Reactor, policy: IPolicyForHTTPS, url_host: str, address: str, connect_timeout: float
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._url_host = url_host.lower()
        self._address = parse_address(address) if address else None
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        target: tuple[str, int] = (host, uri.port)
        if self._address is not None and host.lower() == self._url_host:
            target = self._address
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, target[0], target[1], timeout=self._timeout
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint
