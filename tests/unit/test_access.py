"""security.*: API keys, registry access (networks, Ollama keys, signed blob URLs), model rules and
rate limits, through the whole HTTP tree on a fake clock (StubTreq), plus the parts on their own."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from twisted.internet.task import Clock

from ollama_mirror.config import ConfigError
from ollama_mirror.names import ModelName
from ollama_mirror.security.modelrules import ModelRules
from ollama_mirror.security.ratelimit import RateLimiter, client_address, parse_networks
from ollama_mirror.security.registryauth import (
    AuthFailed,
    AuthorizedKeys,
    Signer,
    TokenIssuer,
    fingerprint,
    parse_public_key,
)
from tests.support.ollamakey import OllamaKey, parse_challenge, token_url

from .fakeregistry import FakeRegistry
from .harness import Harness

MANIFEST = "/v2/library/tiny/manifests/latest"
ACCEPT = {"Accept": ["application/vnd.docker.distribution.manifest.v2+json"]}


def error(body: bytes) -> str:
    document = json.loads(body)
    return str(document["error"]) if "error" in document else str(document["errors"][0]["code"])


# --- the parts -----------------------------------------------------------------------------------


def test_rate_limiter_allows_the_allowance_then_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(clock, 3, 60)
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    assert limiter.take("a") == pytest.approx(20)  # one request comes back every 60/3 s
    assert limiter.take("b") is None  # per client
    clock.advance(20)
    assert limiter.take("a") is None and limiter.take("a") is not None
    assert all(limiter.take("c", 1 / 16) is None for _ in range(48))  # fractions add up
    assert limiter.take("c", 1 / 16) is not None
    assert RateLimiter(clock, 0, 60).take("a") is None  # 0: no limit


def test_forwarded_for_counts_only_from_a_trusted_proxy() -> None:
    trusted = parse_networks(["10.0.0.0/8", "::1"])
    assert client_address("192.0.2.9", ["203.0.113.5"], trusted) == "192.0.2.9"  # not a proxy: ignored
    assert client_address("10.1.1.1", ["203.0.113.5"], trusted) == "203.0.113.5"
    # the rightmost untrusted hop: what the client wrote to the left of it is not believed
    assert client_address("10.1.1.1", ["6.6.6.6, 203.0.113.5, 10.2.2.2"], trusted) == "203.0.113.5"
    assert client_address("10.1.1.1", ["not-an-address"], trusted) == "10.1.1.1"
    assert client_address("10.1.1.1", [], trusted) == "10.1.1.1"
    assert client_address("10.1.1.1", ["203.0.113.5"], ()) == "10.1.1.1"


@pytest.mark.parametrize(
    ("allowed", "blocked", "name", "verdict"),
    [
        (["llama3.2"], [], "llama3.2", True),
        (["llama3.2"], [], "llama3.2:1b", True),  # no tag in the rule: every tag
        (["llama3.2"], [], "registry.ollama.ai/library/llama3.2:latest", True),
        (["llama3.2"], [], "mistral", False),
        (["llama3.2:1b"], [], "llama3.2:3b", False),
        (["llama3.*"], [], "llama3.1:8b", True),
        (["myteam/*"], [], "myteam/coder:7b", True),
        (["myteam/*"], [], "coder:7b", False),
        ([], ["llama3.2:70b"], "llama3.2:1b", True),
        ([], ["llama3.2:70b"], "llama3.2:70b", False),
        (["llama3.2"], ["llama3.2:70b"], "llama3.2:70b", False),  # blocking wins
        ([], ["*/*/*"], "anything/goes:here", False),
        (["Llama3.2"], [], "llama3.2", True),  # names are case-insensitive in Ollama
        ([], ["llama3.2:70b"], "LLAMA3.2:70B", False),
    ],
)
def test_model_rules(allowed: list[str], blocked: list[str], name: str, verdict: bool) -> None:
    rules = ModelRules(allowed, blocked)
    reason = rules.check(ModelName.parse(name))
    assert (reason is None) is verdict
    if reason and blocked:
        assert "security.blocked_models" in reason or "security.allowed_models" in reason


def test_repository_rules_for_blobs() -> None:
    rules = ModelRules(["llama3.2:1b"], ["mistral", "qwen:72b"])
    host = "registry.ollama.ai"
    assert rules.check_repository(host, "library", "llama3.2") is None  # allowed for one tag
    assert "blocked" in (rules.check_repository(host, "library", "mistral") or "")
    assert "allowed_models" in (rules.check_repository(host, "library", "gemma") or "")
    assert ModelRules([], ["qwen:72b"]).check_repository(host, "library", "qwen") is None
    # a rule without a host holds on every upstream; one with a host only there
    assert ModelRules([], ["mistral"]).check(ModelName.parse("registry.example/library/mistral")) is not None
    assert ModelRules([], ["hf.co/*/*"]).check(ModelName.parse("hf.co/someone/thing:q4")) is not None
    assert ModelRules([], ["hf.co/*/*"]).check(ModelName.parse("someone/thing:q4")) is None


def test_signed_urls_and_tokens_expire_and_resist_tampering() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    signer = Signer(b"s" * 32, clock)
    url = signer.sign_path("/v2/library/tiny/blobs/sha256:" + "a" * 64, 60)
    path, _, query = url.partition("?")
    assert signer.check_path(path, query)
    assert not signer.check_path(path.replace("tiny", "other"), query)
    assert not signer.check_path(path, query.replace("expires=", "expires=9"))
    assert not Signer(b"t" * 32, clock).check_path(path, query)
    token = signer.issue_token("alice", ["library/tiny"], 300)
    assert signer.check_token(token, "library/tiny") == "alice"
    with pytest.raises(AuthFailed, match="does not cover"):
        signer.check_token(token, "library/other")
    with pytest.raises(AuthFailed, match="invalid"):
        signer.check_token(token[:-1] + ("0" if token[-1] != "0" else "1"), "library/tiny")
    clock.advance(61)
    assert not signer.check_path(path, query)
    clock.advance(300)
    with pytest.raises(AuthFailed, match="expired"):
        signer.check_token(token, "library/tiny")


def issuer_for(tmp_path: Path, *keys: OllamaKey) -> tuple[TokenIssuer, Clock]:
    keyfile = tmp_path / "authorized_keys"
    keyfile.write_text("# clients\n\n" + "".join(k.public_line() + "\n" for k in keys) + "garbage line\n")
    clock = Clock()
    clock.advance(1_700_000_000)
    return TokenIssuer(AuthorizedKeys(str(keyfile)), Signer(b"k" * 32, clock), clock, 300), clock


def test_token_requests_signed_like_ollama(tmp_path: Path) -> None:
    alice, mallory = OllamaKey("alice@gpu1"), OllamaKey("mallory")
    issuer, clock = issuer_for(tmp_path, alice)
    challenge = {
        "realm": "http://mirror:11434/v2/token",
        "service": "mirror:11434",
        "scope": "repository:library/tiny:pull",
    }
    url = token_url(challenge, now=clock.seconds())
    query = urlsplit(url).query
    token, who = issuer.issue(alice.token_request_authorization(url), [url], query)
    assert who == "alice@gpu1" and token
    with pytest.raises(AuthFailed, match="already used"):  # the same nonce twice: a replay
        issuer.issue(alice.token_request_authorization(url), [url], query)
    url2 = token_url(challenge, now=clock.seconds())
    with pytest.raises(AuthFailed, match="not authorized"):
        issuer.issue(mallory.token_request_authorization(url2), [url2], urlsplit(url2).query)
    forged = alice.public_b64 + ":" + mallory.token_request_authorization(url2).split(":")[1]
    with pytest.raises(AuthFailed, match="bad signature"):
        issuer.issue(forged, [url2], urlsplit(url2).query)
    other = url2.replace("library%2Ftiny", "library%2Fother")  # signed one URL, sent another
    with pytest.raises(AuthFailed, match="bad signature"):
        issuer.issue(alice.token_request_authorization(url2), [other], urlsplit(other).query)
    stale = token_url(challenge, now=clock.seconds() - 3600)
    with pytest.raises(AuthFailed, match="ts"):
        issuer.issue(alice.token_request_authorization(stale), [stale], urlsplit(stale).query)
    with pytest.raises(AuthFailed, match="malformed|expected"):
        issuer.issue("Bearer nonsense", [url2], urlsplit(url2).query)


def test_the_authorized_keys_file_takes_ed25519_keys_only_and_names_refused_ones(tmp_path: Path) -> None:
    alice = OllamaKey("alice@gpu1")
    bare = OllamaKey()
    rsa = subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(tmp_path / "rsa")],
        capture_output=True,
        check=False,
    )
    keyfile = tmp_path / "authorized_keys"
    lines = [
        alice.public_line(),
        f"ssh-ed25519 {bare.public_b64}",  # no comment: named by its fingerprint
        f"ssh-ed25519 {alice.public_b64[:-8]}",  # truncated
        "ssh-ed25519 not-base64!",
    ]
    if rsa.returncode == 0:
        lines.append((tmp_path / "rsa.pub").read_text().strip())  # Ollama keys are ed25519: skipped
    keyfile.write_text("\n".join(lines) + "\n")
    keys = AuthorizedKeys(str(keyfile))
    assert len(keys) == 2
    found = keys.find(base64.b64decode(bare.public_b64))
    assert found is not None and found.comment == fingerprint(base64.b64decode(bare.public_b64))
    pub = tmp_path / "bare.pub"
    pub.write_text(f"ssh-ed25519 {bare.public_b64} x\n")
    listed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=False)
    if listed.returncode == 0:  # the fingerprint the refusal names is the one ssh-keygen prints
        assert listed.stdout.split()[1] == found.comment
    with pytest.raises(ValueError, match="ed25519"):
        parse_public_key("ssh-rsa AAAAB3NzaC1yc2E comment")


def test_a_refused_key_is_named_by_its_fingerprint(tmp_path: Path) -> None:
    issuer, clock = issuer_for(tmp_path, OllamaKey("alice"))
    stranger = OllamaKey()
    challenge = {
        "realm": "http://mirror:11434/v2/token",
        "service": "mirror:11434",
        "scope": "repository:a/b:pull",
    }
    url = token_url(challenge, now=clock.seconds())
    with pytest.raises(AuthFailed) as refused:
        issuer.issue(stranger.token_request_authorization(url), [url], urlsplit(url).query)
    assert str(refused.value) == (
        f"the key {fingerprint(base64.b64decode(stranger.public_b64))} is not authorized on this mirror: add "
        "the Ollama server's ~/.ollama/id_ed25519.pub to the file in security.registry_authorized_keys"
    )


# --- through the HTTP tree -----------------------------------------------------------------------


def test_api_keys_guard_api_and_mirror_routes_but_not_health(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"security.api_key": "k1", "security.api_keys": "k2,k3"})
    for path in ("/api/tags", "/api/version", "/mirror/stats", "/v1/models"):
        response, body = h.request("GET", path)
        assert response.code == 401 and "API key" in error(body), path
    response, body = h.request("GET", "/api/tags", headers={"Authorization": ["Bearer wrong"]})
    assert response.code == 401 and error(body) == "unauthorized: wrong API key"
    for key in ("k1", "k3"):
        response, body = h.request("GET", "/api/tags", headers={"Authorization": [f"Bearer {key}"]})
        assert response.code == 200 and json.loads(body) == {"models": []}
    assert h.request("GET", "/mirror/health")[0].code in (200, 503)
    assert h.request("GET", "/")[0].code == 200  # "Ollama is running": the CLI's HEAD /
    # open to load balancers, but without a key only statuses: no path, URL or detail to learn from
    anonymous = json.loads(h.request("GET", "/mirror/health")[1])
    assert set(anonymous) == {"status", "checks"}
    assert all(set(check) == {"status"} for check in anonymous["checks"].values())
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": [f"Bearer {key}"]}
        text = h.request("GET", "/mirror/health", headers=headers)[1].decode()
        assert str(tmp_path) not in text and "registry.example" not in text
    detailed = json.loads(h.request("GET", "/mirror/health", headers={"Authorization": ["Bearer k2"]})[1])
    assert detailed["checks"]["cache_writable"]["path"] == str(tmp_path / "cache")
    assert detailed["checks"]["upstream"]["url"].startswith("http://registry.example")
    assert h.request("GET", "/metrics")[0].code == 200  # unless protect_metrics
    assert h.request("GET", MANIFEST, headers=ACCEPT)[0].code == 200  # /v2 has its own rules


def test_metrics_can_be_protected(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"security.api_key": "k", "security.protect_metrics": "true"})
    assert h.request("GET", "/metrics")[0].code == 401
    assert h.request("GET", "/metrics", headers={"Authorization": ["Bearer k"]})[0].code == 200


def test_model_rules_on_pull_show_and_registry_routes(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.add_model("library/other", "latest", [b"weights", b"tmpl"])
    h = Harness(tmp_path, registry, **{"security.blocked_models": "other"})
    response, body = h.request("POST", "/api/pull", data=b'{"model":"other","stream":false}')
    assert response.code == 403 and "'other'" in error(body) and "blocked_models" in error(body)
    response, body = h.request("POST", "/api/show", data=b'{"model":"other:latest"}')
    assert response.code == 403
    response, body = h.request("GET", "/v2/library/other/manifests/latest", headers=ACCEPT)
    assert response.code == 403 and error(body) == "DENIED"
    digest = registry.digests("library/other")[0]
    assert h.request("GET", f"/v2/library/other/blobs/{digest}")[0].code == 403
    # an encoded slash would route differently from how it reads: refused before any rule
    assert h.request("GET", "/v2/library%2Fother/manifests/latest", headers=ACCEPT)[0].code == 400
    response, body = h.request("POST", "/api/pull", step=0.05, data=b'{"model":"tiny","stream":false}')
    assert response.code == 200, body
    response, body = h.request("POST", "/api/pull", data=b"{not json")
    assert response.code == 400  # a bad body is still the route's own 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("DELETE", "/%2Fmirror/cache", None),
        ("GET", "/%2Fapi/tags", None),
        ("GET", "/%2Fmirror/stats", None),
        ("POST", "/%2Fapi/pull", b'{"model":"other","stream":false}'),
        ("POST", "/api%2Fx/pull", b'{"model":"other","stream":false}'),
        ("GET", "/%2Fv2/library/tiny/manifests/latest", None),
        ("GET", "//v2/library/tiny/manifests/latest", None),
        ("GET", "/v2%2Fx/library/other/manifests/latest", None),
        ("GET", "//api/tags", None),
        ("POST", "/api//pull", b'{"model":"other","stream":false}'),
        ("GET", "/v2/library//tiny/manifests/latest", None),
    ],
)
def test_paths_that_route_other_than_they_read_are_refused_before_any_rule(
    tmp_path: Path, registry: FakeRegistry, method: str, path: str, body: bytes | None
) -> None:
    """An encoded slash or an empty segment once walked past the API key, the registry networks and
    the model rules (Klein and werkzeug saw another route than the guard judged)."""
    registry.add_model("library/other", "latest", [b"weights", b"tmpl"])
    h = Harness(
        tmp_path,
        registry,
        **{
            "security.api_key": "k",
            "security.registry_access": "networks",
            "security.registry_networks": "10.0.0.0/8",
            "security.blocked_models": "other",
        },
    )
    key = {"Authorization": ["Bearer k"]}
    pulled, _ = h.request(
        "POST", "/api/pull", step=0.05, headers=key, data=b'{"model":"tiny","stream":false}'
    )
    assert pulled.code == 200
    kwargs: dict[str, Any] = {"headers": ACCEPT} if body is None else {"data": body}
    response, answer = h.request(method, path, **kwargs)
    assert response.code == 400, (path, answer)
    assert "encoded-slash" in answer.decode()
    # nothing was removed, fetched or served behind the rules' back
    _, tags = h.request("GET", "/api/tags", headers=key)
    assert [m["name"] for m in json.loads(tags)["models"]] == ["tiny:latest"]


def test_allowed_models_only(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"security.allowed_models": "tiny:latest"})
    assert h.request("GET", MANIFEST, headers=ACCEPT)[0].code == 200
    response, body = h.request("GET", "/v2/library/tiny/manifests/v2", headers=ACCEPT)
    assert response.code == 403 and "allowed_models" in json.loads(body)["errors"][0]["message"]
    assert h.request("GET", "/v2/library/gemma/manifests/latest", headers=ACCEPT)[0].code == 403


def test_rate_limit_charges_only_requests_that_go_upstream(tmp_path: Path, registry: FakeRegistry) -> None:
    """A tag the mirror must fetch costs one unit; what it holds, or is fetching, and everything that
    never goes upstream costs nothing, however often one address asks."""
    for tag in ("a", "b", "c", "d"):
        registry.add_model("library/tiny", tag, [b"weights-" + tag.encode(), b"tmpl"])
    h = Harness(
        tmp_path, registry, **{"security.rate_limit_requests": "3", "security.rate_limit_window": "30"}
    )
    assert all(h.request("GET", "/api/version")[0].code == 200 for _ in range(20))
    assert [h.request("GET", f"/v2/library/tiny/manifests/{t}", headers=ACCEPT)[0].code for t in "abc"] == [
        200
    ] * 3
    response, body = h.request("GET", "/v2/library/tiny/manifests/d", headers=ACCEPT)
    assert response.code == 429 and error(body) == "TOOMANYREQUESTS"
    assert response.headers.getRawHeaders("retry-after") == ["10"]
    # a fresh tag, and the blobs its manifest lists, are served to this address as often as it asks
    for _ in range(20):
        assert h.request("GET", "/v2/library/tiny/manifests/a", headers=ACCEPT)[0].code == 200
        for digest in registry.digests("library/tiny", "a"):
            ranged = {"Range": ["bytes=0-1"]}
            assert h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers=ranged)[0].code == 206
    assert h.request("GET", "/mirror/health")[0].code != 429
    response, body = h.request("POST", "/api/pull", data=b'{"model":"tiny:d","stream":false}')
    assert response.code == 429 and "rate_limit_requests" in error(body)
    assert h.request("POST", "/api/pull", data=b'{"model":"tiny:a","stream":false}')[0].code == 200
    h.clock.advance(10)
    assert h.request("GET", "/v2/library/tiny/manifests/d", headers=ACCEPT)[0].code == 200


def test_a_blob_no_served_manifest_lists_costs_a_unit(tmp_path: Path, registry: FakeRegistry) -> None:
    """Asking for blobs by digest, without their manifest, is how one would make the mirror download
    arbitrary things: each new one is charged (the limit would stop a scan)."""
    registry.add_model("library/tiny", "x", [b"one", b"two", b"three", b"four"])
    h = Harness(
        tmp_path, registry, **{"security.rate_limit_requests": "3", "security.rate_limit_window": "30"}
    )
    codes = [
        h.request("GET", f"/v2/library/tiny/blobs/{d}")[0].code for d in registry.digests("library/tiny", "x")
    ]
    assert codes[:3] == [200] * 3 and codes[3] == 429


def test_wrong_credentials_are_charged_right_ones_are_not(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(
        tmp_path,
        registry,
        **{"security.api_key": "k", "security.rate_limit_requests": "3", "security.rate_limit_window": "30"},
    )
    good = {"Authorization": ["Bearer k"]}
    bad = {"Authorization": ["Bearer guess"]}
    assert [h.request("GET", "/api/tags", headers=bad)[0].code for _ in range(4)] == [401, 401, 401, 429]
    assert h.request("GET", "/api/tags")[0].code == 401  # no key at all: a plain 401, never charged
    h.clock.advance(30)
    assert all(h.request("GET", "/api/tags", headers=good)[0].code == 200 for _ in range(10))


def test_registry_networks(tmp_path: Path, registry: FakeRegistry) -> None:
    with pytest.raises(ConfigError, match="registry_networks"):
        Harness(tmp_path, registry, **{"security.registry_access": "networks"})
    h = Harness(
        tmp_path,
        registry,
        **{"security.registry_access": "networks", "security.registry_networks": "10.0.0.0/8"},
    )
    response, body = h.request("GET", MANIFEST, headers=ACCEPT)
    assert response.code == 403 and error(body) == "DENIED"
    h = Harness(
        tmp_path,
        registry,
        **{"security.registry_access": "networks", "security.registry_networks": "127.0.0.1,::1"},
    )
    assert h.request("GET", MANIFEST, headers=ACCEPT)[0].code == 200


def keys_harness(tmp_path: Path, registry: FakeRegistry, key: OllamaKey, **settings: str) -> Harness:
    keyfile = tmp_path / "authorized_keys"
    keyfile.write_text(key.public_line() + "\n")
    h = Harness(
        tmp_path,
        registry,
        **{"security.registry_access": "keys", "security.registry_authorized_keys": str(keyfile), **settings},
    )
    h.clock.advance(1_700_000_000)
    return h


def get_token(h: Harness, key: OllamaKey, challenge_header: str) -> Any:
    url = token_url(parse_challenge(challenge_header), now=h.clock.seconds())
    parts = urlsplit(url)
    return h.request(
        "GET",
        f"{parts.path}?{parts.query}",
        headers={"Authorization": [key.token_request_authorization(url)]},
    )


def test_the_ollama_key_flow(tmp_path: Path, registry: FakeRegistry) -> None:
    key = OllamaKey("gpu1")
    h = keys_harness(tmp_path, registry, key)
    response, body = h.request("GET", MANIFEST, headers=ACCEPT)
    assert response.code == 401 and error(body) == "UNAUTHORIZED"
    [challenge] = response.headers.getRawHeaders("www-authenticate")
    assert parse_challenge(challenge) == {
        "realm": "http://mirror.test/v2/token",  # on the host:port the client asked
        "service": "mirror.test",
        "scope": "repository:library/tiny:pull",
    }
    response, body = get_token(h, OllamaKey("stranger"), challenge)
    assert response.code == 401
    response, body = get_token(h, key, challenge)
    assert response.code == 200, body
    bearer = {"Authorization": [f"Bearer {json.loads(body)['token']}"]}
    assert h.request("GET", MANIFEST, headers={**ACCEPT, **bearer})[0].code == 200
    digest = registry.digests()[0]
    blob = f"/v2/library/tiny/blobs/{digest}"
    assert h.request("HEAD", blob)[0].code == 401
    assert h.request("HEAD", blob, headers=bearer)[0].code == 200
    response, _ = h.request("GET", blob, headers=bearer)
    [location] = response.headers.getRawHeaders("location")
    assert location.startswith(blob + "?expires=") and "signature=" in location
    # the ranged GETs that follow carry no credentials: the signed Location lets them through
    response, body = h.request("GET", location, headers={"Range": ["bytes=0-9"]})
    assert response.code == 206 and len(body) == 10
    assert h.request("GET", blob, headers={"Range": ["bytes=0-9"]})[0].code == 401
    other = location.replace(digest, registry.digests()[1])  # another blob, the same signature
    assert h.request("GET", other, headers={"Range": ["bytes=0-9"]})[0].code == 401
    assert h.request("GET", "/v2/library/other/manifests/latest", headers={**ACCEPT, **bearer})[0].code == 401
    h.clock.advance(3601)  # security.registry_url_lifetime, and the token's 300 s, have passed
    assert h.request("GET", location, headers={"Range": ["bytes=0-9"]})[0].code == 401
    assert h.request("GET", MANIFEST, headers={**ACCEPT, **bearer})[0].code == 401


def test_keys_mode_needs_a_readable_key_file(tmp_path: Path, registry: FakeRegistry) -> None:
    with pytest.raises(ConfigError, match="registry_authorized_keys"):
        Harness(tmp_path, registry, **{"security.registry_access": "keys"})
    with pytest.raises(ConfigError, match="cannot read"):
        Harness(
            tmp_path,
            registry,
            **{
                "security.registry_access": "keys",
                "security.registry_authorized_keys": str(tmp_path / "none"),
            },
        )


def test_the_signing_secret_is_kept_in_the_cache(tmp_path: Path, registry: FakeRegistry) -> None:
    key = OllamaKey()
    first = keys_harness(tmp_path, registry, key)
    secret = tmp_path / "cache" / ".mirror" / "signing.key"
    assert secret.stat().st_mode & 0o077 == 0
    _, body = get_token(
        first,
        key,
        first.request("GET", MANIFEST, headers=ACCEPT)[0].headers.getRawHeaders("www-authenticate")[0],
    )
    token = json.loads(body)["token"]
    second = keys_harness(tmp_path, registry, key)  # a restart, or a second worker on the same cache
    assert (
        second.request("GET", MANIFEST, headers={**ACCEPT, "Authorization": [f"Bearer {token}"]})[0].code
        == 200
    )


def test_keys_mode_lets_listed_networks_in_and_follows_a_trusted_proxy(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    key = OllamaKey()
    h = keys_harness(tmp_path, registry, key, **{"security.registry_networks": "127.0.0.0/8"})
    assert h.request("GET", MANIFEST, headers=ACCEPT)[0].code == 200  # a listed network needs no key
    h = keys_harness(tmp_path, registry, key, **{"security.trusted_proxies": "127.0.0.1"})
    response, _ = h.request("GET", MANIFEST, headers={**ACCEPT, "X-Forwarded-Proto": ["https"]})
    [challenge] = response.headers.getRawHeaders("www-authenticate")
    assert parse_challenge(challenge)["realm"] == "https://mirror.test/v2/token"  # TLS ended at the proxy
    response, _ = get_token(h, key, challenge)  # signed for https://..., received as http://...
    assert response.code == 200
