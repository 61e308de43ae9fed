"""Several mirror nodes as one: a shared S3-compatible store for blobs and manifests.

The modules below import ``botocore`` (the ``cluster`` extra); this one does not, so that a single node
without it still starts, and a cluster configuration without it is told what to install.
"""

from __future__ import annotations

from ..config import ConfigError


def missing_extra(error: ImportError) -> ConfigError:
    """The configuration error of a cluster setting on an installation without the ``cluster`` extra."""
    return ConfigError(
        f"cluster.storage_url: this installation lacks {error.name}: pip install 'ollama-mirror[cluster]'"
    )
