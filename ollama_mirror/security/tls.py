"""TLS towards clients (towards upstreams: :mod:`ollama_mirror.upstream.trust`).

``ssl:`` listeners without a ``privateKey`` of their own serve the certificate of
``server.tls_certificate``/``tls_key``/``tls_chain`` through :class:`ServerTLS`, whose context is
swapped on :meth:`ServerTLS.reload` (SIGHUP): new connections get the new certificate, the listening
socket and the connections already open are untouched.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from ..config import ConfigError
from ..runner import Reactor
from ..upstream.trust import read_certificates, read_pem
from .connections import with_backlog

log = Logger(namespace="ollama_mirror.tls")  # pinned: log names are public


# --- reading PEM files ---------------------------------------------------------------------------


def read_private_key(path: str, what: str) -> PrivateKeyTypes:
    """The key of a PEM file; an encrypted one is refused (a daemon cannot ask for its passphrase)."""
    try:
        key = serialization.load_pem_private_key(read_pem(path, what), password=None)
    except TypeError:
        raise ConfigError(f"{what}: {path} is encrypted; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{what}: {path} holds no readable PEM private key ({e})") from None
    return key


# --- towards clients -----------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The served certificate, read from files and read again by :meth:`reload`."""

    def __init__(self, certificate: str, key: str, chain: str = "") -> None:
        self.paths = (certificate, key, chain)
        self._context, self.subject, self.not_after = self._load()

    def _load(self) -> tuple[SSL.Context, str, str]:
        certificate, key, chain = self.paths
        certificates = read_certificates(certificate, "server.tls_certificate")
        if chain:
            certificates += read_certificates(chain, "server.tls_chain")
        private_key = read_private_key(key, "server.tls_key")
        try:  # X509 and PKey, as Twisted's CertificateOptions declares them
            options = CertificateOptions(
                privateKey=PKey.from_cryptography_key(private_key),  # type: ignore[arg-type]
                certificate=X509.from_cryptography(certificates[0]),
                extraCertChain=[X509.from_cryptography(c) for c in certificates[1:]],
            )
            context = options.getContext()
        except SSL.Error:
            raise ConfigError(
                f"server.tls_key: {key} is not the key of the certificate in {certificate}"
            ) from None
        leaf = certificates[0]
        return context, _describe(leaf), leaf.not_valid_after_utc.isoformat()

    def reload(self) -> bool:
        """Read the files again; new connections get the new certificate.  A file that cannot be
        used is logged and the certificate served until now stays."""
        try:
            self._context, self.subject, self.not_after = self._load()
        except ConfigError as e:
            log.error(
                "TLS certificate not reloaded, still serving {subject}: {error}",
                subject=self.subject,
                error=e,
            )
            return False
        log.info(
            "TLS certificate reloaded: {subject}, valid until {not_after}",
            subject=self.subject,
            not_after=self.not_after,
        )
        return True

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)  # the context of now: a reload swaps it


def _describe(certificate: x509.Certificate) -> str:
    """The subject and the names a certificate is for, as an operator checks them in the log."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = [str(a) for a in names.get_values_for_type(x509.IPAddress)]
        listed = [*names.get_values_for_type(x509.DNSName), *addresses]
    except x509.ExtensionNotFound:
        listed = []
    return f"{certificate.subject.rfc4514_string()} for {', '.join(listed) or '(no names)'}"


def is_managed_tls(description: str) -> bool:
    """An ``ssl:`` endpoint without a ``privateKey=`` of its own: it serves ``server.tls_*``."""
    kind, _, rest = description.partition(":")
    return kind == "ssl" and "privateKey=" not in rest


def listener(
    description: str, factory: IProtocolFactory, reactor: Reactor, tls: ServerTLS | None
) -> IService:
    """A listening service for one strports *description*.

    ``ssl:PORT[:interface=..][:backlog=..]`` without ``privateKey=`` listens by TCP and speaks TLS with
    :class:`ServerTLS` (so that the certificate can be reloaded); any other description goes to
    strports as it is.
    """
    description = with_backlog(description)
    if not is_managed_tls(description):
        return strports.service(description, factory, reactor=reactor)
    if tls is None:
        raise ConfigError(
            f"server.listen: {description!r} needs server.tls_certificate and server.tls_key "
            "(or a privateKey= of its own)"
        )
    tcp = "tcp:" + description.partition(":")[2]
    return strports.service(tcp, TLSMemoryBIOFactory(tls, False, factory), reactor=reactor)
