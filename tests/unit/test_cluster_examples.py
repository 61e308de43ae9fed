"""The cluster examples in ``etc/cluster/`` (Compose and Kubernetes) say only what the daemon reads.

No Docker engine or Kubernetes runs here: these checks read the files as the tools would (YAML, with
Compose's anchors and merge keys) and hold every setting they give against the configuration schema, so
an example cannot drift from the keys the daemon knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ollama_mirror.config import load_config
from ollama_mirror.config.schema import keys

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "etc" / "cluster"
KNOWN = {key.env for key in keys()} | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POD_IP"}


def as_environ(environment: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in environment.items()}


def test_the_compose_nodes_are_one_cluster_each_with_its_own_address_and_cache() -> None:
    compose: dict[str, Any] = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    nodes = {name: s for name, s in compose["services"].items() if name.startswith("node")}
    assert len(nodes) == 3
    environments = [service["environment"] for service in nodes.values()]
    for environment in environments:
        assert set(environment) <= KNOWN, set(environment) - KNOWN
        config = load_config(None, as_environ(environment))  # (every value parses)
        assert config.cluster.storage_url == "s3://models/mirror" and config.cluster.redis_url
        assert config.security.signing_secret
    assert len({e["OLLAMA_MIRROR_NODE_URL"] for e in environments}) == 3
    assert len({tuple(service["volumes"]) for service in nodes.values()}) == 3
    assert {e["OLLAMA_MIRROR_SIGNING_SECRET"] for e in environments} == {
        environments[0]["OLLAMA_MIRROR_SIGNING_SECRET"]
    }
    s3 = json.loads((EXAMPLES / "s3.json").read_text())
    keys_given = {c["accessKey"]: c["secretKey"] for i in s3["identities"] for c in i["credentials"]}
    assert keys_given[environments[0]["AWS_ACCESS_KEY_ID"]] == environments[0]["AWS_SECRET_ACCESS_KEY"]


def test_the_kubernetes_pods_reach_each_other_at_their_own_address() -> None:
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"Secret", "Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    environment = {e["name"]: e.get("value", "") for e in container["env"]}
    secret = kinds["Secret"]["stringData"]
    assert set(environment) | set(secret) <= KNOWN, (set(environment) | set(secret)) - KNOWN
    assert environment["OLLAMA_MIRROR_NODE_URL"] == "http://$(POD_IP):11434"
    settings = {**as_environ(environment), **as_environ(secret)}
    settings["OLLAMA_MIRROR_NODE_URL"] = "http://10.1.2.3:11434"  # (as Kubernetes expands it)
    config = load_config(None, settings)
    assert config.cluster.storage_url and config.cluster.redis_url and config.security.signing_secret
    assert container["readinessProbe"]["httpGet"]["path"] == "/mirror/health"
