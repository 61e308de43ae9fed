"""Private models (``private.namespaces``): names that live on the mirror only, never asked of an upstream.

Real parts: the distribution registry behind the counting fault proxy, and the daemon under twistd.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import UPSTREAM_SETTINGS, registry_error_code
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import http_request

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def private_mirror(mirror_factory: MirrorFactory, proxy: FaultProxy) -> MirrorDaemon:
    config = {"upstream": UPSTREAM_SETTINGS, "private": {"namespaces": ["team", "lab-*"]}}
    return mirror_factory(upstream_url=proxy.url, config=config)


def test_a_private_name_never_pushed_is_unknown_without_asking_any_upstream(
    private_mirror: MirrorDaemon, proxy: FaultProxy
) -> None:
    proxy.clear_records()
    for namespace in ("team", "lab-3"):
        manifest = http_request("GET", f"{private_mirror.url}/v2/{namespace}/mymodel/manifests/latest")
        assert manifest.status == 404 and registry_error_code(manifest) == "MANIFEST_UNKNOWN"
        by_digest = http_request("GET", f"{private_mirror.url}/v2/{namespace}/mymodel/manifests/{DIGEST}")
        assert by_digest.status == 404 and registry_error_code(by_digest) == "MANIFEST_UNKNOWN"
        for method in ("HEAD", "GET"):
            blob = http_request(method, f"{private_mirror.url}/v2/{namespace}/mymodel/blobs/{DIGEST}")
            assert blob.status == 404
        pulled = http_request(
            "POST",
            f"{private_mirror.url}/api/pull",
            body=json.dumps({"model": f"{namespace}/mymodel", "stream": False}).encode(),
        )
        assert "file does not exist" in pulled.json()["error"]  # (Ollama's own answer to an unknown model)
    assert proxy.records() == []  # not one request upstream
    public = http_request("GET", f"{private_mirror.url}/v2/other/mymodel/manifests/latest")
    assert public.status == 404 and proxy.records()  # (a namespace that is not private is asked upstream)
