"""Small *real* Ollama-format models for integration tests, and a synchronous pusher.

- :func:`make_gguf` writes a real GGUF file (read back by ``gguf.GGUFReader``) of any size from a few KiB to
  several GiB without holding the tensor data in memory.
- :func:`build_model` writes every blob of an Ollama model (GGUF, template, params, license, config) into
  ``workdir/blobs/sha256-<hex>`` and builds the manifest bytes, exactly as ``ollama create`` lays them out.
- :func:`push_model` uploads the blobs and the manifest to a registry with the OCI distribution API, using
  plain ``http.client`` (this runs in test set-up, outside any reactor), and checks the result.

Blobs are hashed as they are written and streamed from disk when pushed, so a 1 GiB model costs about
1 GiB of disk and a few MiB of memory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol
from urllib.parse import urljoin, urlsplit

import gguf
import numpy as np

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_TEMPLATE = "{{ .Prompt }}"
DEFAULT_PARAMS: dict[str, Any] = {"stop": ["<|end|>"]}
DEFAULT_LICENSE = "Test model for ollama-mirror. Public domain: no rights reserved.\n"

WRITE_CHUNK = 4 * MiB  # tensor data is generated, hashed and written in pieces of this size
MAX_TENSOR_BYTES = 16 * MiB  # the filler is split into tensors of at most this size, like real weights
HTTP_TIMEOUT = 60.0
SMALL_MODEL_SIZE = 64 * KiB  # the default model: ~64 KiB of tensor data, pushed in well under a second

Fill = Literal["random", "zeros"]


# --- data types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """One blob of a model as it appears in the manifest, plus where its bytes are on disk."""

    media_type: str
    digest: str  # "sha256:<64 hex>"
    size: int
    path: Path

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def cache_name(self) -> str:
        """The file name Ollama gives this blob in a models directory: ``sha256-<hex>``."""
        return "sha256-" + self.hex

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def read_bytes(self) -> bytes:
        """The whole blob (only for small ones; big blobs should be streamed from :attr:`path`)."""
        return self.path.read_bytes()

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start..end`` inclusive, like ``Range: bytes=start-end``."""
        with self.path.open("rb") as fh:
            fh.seek(start)
            return fh.read(end - start + 1)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    digest: str
    size: int
    n_params: int
    tensor_bytes: int


@dataclass(frozen=True)
class BuiltModel:
    """An Ollama model on disk: its blobs, its config and the exact manifest bytes."""

    manifest: bytes
    digest: str  # sha256 of the manifest bytes, "sha256:<hex>"
    config: Blob
    config_data: dict[str, Any]
    layers: tuple[Blob, ...]
    n_params: int

    @property
    def manifest_hex(self) -> str:
        """What ``/api/tags`` shows as ``digest``: the hex sha256 of the manifest, no prefix."""
        return self.digest.split(":", 1)[1]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The config blob then the layers: everything a pull fetches after the manifest."""
        return (self.config, *self.layers)

    @property
    def total_size(self) -> int:
        """The size ``/api/tags`` reports: layers plus config."""
        return sum(blob.size for blob in self.blobs)

    @property
    def model_layer(self) -> Blob:
        return self.layer(MEDIA_MODEL)

    def layer(self, media_type: str) -> Blob:
        for blob in self.layers:
            if blob.media_type == media_type:
                return blob
        raise KeyError(media_type)

    def blob(self, digest: str) -> Blob:
        for blob in self.blobs:
            if blob.digest == digest:
                return blob
        raise KeyError(digest)


@dataclass(frozen=True)
class PushedModel(BuiltModel):
    """A :class:`BuiltModel` that is in a registry as ``repo:tag``."""

    registry_url: str = ""
    repo: str = ""  # "library/tiny"
    tag: str = "latest"

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:PORT``: the host part of the model name as an Ollama client writes it."""
        return urlsplit(self.registry_url).netloc

    @property
    def name(self) -> str:
        """The fully qualified model name: ``127.0.0.1:PORT/library/tiny:latest``."""
        return f"{self.registry_host}/{self.repo}:{self.tag}"

    @property
    def short_name(self) -> str:
        """``tiny:latest`` for ``library/tiny``, else ``namespace/model:tag``."""
        repo = self.repo.removeprefix("library/")
        return f"{repo}:{self.tag}"

    @property
    def manifest_url(self) -> str:
        return f"{self.registry_url}/v2/{self.repo}/manifests/{self.tag}"

    def blob_url(self, digest: str) -> str:
        return f"{self.registry_url}/v2/{self.repo}/blobs/{digest}"


class ModelFactory(Protocol):
    """The ``model_factory`` fixture: build and push ``repo:tag`` (cached by arguments)."""

    def __call__(
        self, repo: str, tag: str = "latest", size: int = SMALL_MODEL_SIZE, seed: int = 0, **build_args: Any
    ) -> PushedModel: ...


# --- writing blobs --------------------------------------------------------------------------------


class _HashingWriter:
    """Writes to a file and hashes what it wrote."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.size += len(data)


def _publish(tmp: Path, blobs_dir: Path, hex_digest: str) -> Path:
    final = blobs_dir / f"sha256-{hex_digest}"
    os.replace(tmp, final)
    return final


def write_blob(blobs_dir: Path, media_type: str, data: bytes) -> Blob:
    """Store a small blob as ``blobs_dir/sha256-<hex>``."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    hex_digest = hashlib.sha256(data).hexdigest()
    fd, tmp_name = tempfile.mkstemp(dir=blobs_dir, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path = _publish(Path(tmp_name), blobs_dir, hex_digest)
    return Blob(media_type, "sha256:" + hex_digest, len(data), path)


def go_json(value: Any) -> bytes:
    """JSON as Go's ``json.Marshal`` writes it: compact, and ``<``, ``>``, ``&`` escaped as ``\\u003c``…"""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber`` (``model_type``, ``parameter_size``): 8.0B, 137M, 33K."""
    if n >= 1_000_000_000:
        value = n / 1_000_000_000
        return f"{value:.0f}B" if value == int(value) else f"{value:.1f}B"
    if n >= 1_000_000:
        value = n / 1_000_000
        return f"{value:.0f}M" if value == int(value) else f"{value:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.0f}K"
    return str(n)


# --- GGUF -----------------------------------------------------------------------------------------

_TOKENS = ["<unk>", "<s>", "</s>", "<|end|>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], " ", "."]


def _tensor_plan(n_params_bytes: int, n_embd: int) -> list[tuple[str, tuple[int, ...], np.dtype[Any]]]:
    """Tensors (name, numpy shape, dtype) adding up to at least ``n_params_bytes`` bytes of data."""
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    plan: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = [
        ("token_embd.weight", (len(_TOKENS), n_embd), f16),
        ("output_norm.weight", (n_embd,), f32),
    ]
    row_bytes = n_embd * f16.itemsize
    used = len(_TOKENS) * row_bytes + n_embd * f32.itemsize
    rows_left = max(1, -(-(n_params_bytes - used) // row_bytes))
    max_rows = max(1, MAX_TENSOR_BYTES // row_bytes)
    block = 0
    while rows_left > 0:
        rows = min(rows_left, max_rows)
        plan.append((f"blk.{block}.ffn_up.weight", (rows, n_embd), f16))
        rows_left -= rows
        block += 1
    return plan


def _fill_bytes(rng: np.random.Generator, n: int, fill: Fill, dtype: np.dtype[Any]) -> bytes:
    if fill == "zeros":
        return bytes(n)
    if dtype == np.float32:
        return rng.random(n // 4, dtype=np.float32).tobytes()
    # Random float16 in [0, 1): bit patterns below 0x3c00 (no NaN or infinity), fast to make.
    raw = np.frombuffer(rng.bytes(n), dtype=np.uint16) & np.uint16(0x3BFF)
    return raw.tobytes()


def make_gguf(
    path: Path | str,
    *,
    arch: str = "llama",
    n_params_bytes: int = 64 * KiB,
    context_length: int = 2048,
    name: str = "tiny",
    seed: int = 0,
    embedding_length: int = 64,
    fill: Fill = "random",
) -> GGUFFile:
    """Write a real GGUF v3 file and return its sha256 digest and size.

    The metadata is a plausible tiny llama: ``general.architecture``, ``general.name``, ``general.file_type``
    (1 = mostly F16), ``general.parameter_count``, ``<arch>.context_length``, ``<arch>.embedding_length``,
    ``<arch>.block_count`` and friends, and a 32-token ``tokenizer.ggml.*`` vocabulary. The tensors are
    ``token_embd.weight`` (F16), ``output_norm.weight`` (F32) and as many ``blk.N.ffn_up.weight`` (F16, at
    most 16 MiB each) as needed to hold ``n_params_bytes`` bytes of tensor data (rounded up to a whole row);
    the file is that plus a header of about 1.5 KiB. ``fill="random"`` draws the values from ``seed``
    (different seeds give different files); ``"zeros"`` is faster for huge benchmark files (the header still
    holds the seed).

    ``GGUFWriter`` wants every tensor in memory, so it is only used for the header, the key/values and the
    tensor infos (declared with ``add_tensor_info``); the tensor data is then appended here in 4 MiB pieces
    with the same alignment rules (each tensor padded to ``general.alignment`` = 32 bytes), hashed as written.
    """
    path = Path(path)
    plan = _tensor_plan(n_params_bytes, embedding_length)
    n_params = sum(int(np.prod(shape)) for _, shape, _ in plan)
    n_blocks = len(plan) - 2

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_description(f"ollama-mirror test model, seed {seed}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_uint64("general.parameter_count", n_params)  # what Ollama's ggml.KV.ParameterCount reads
    writer.add_context_length(context_length)
    writer.add_embedding_length(embedding_length)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(embedding_length * 4)
    writer.add_head_count(max(1, embedding_length // 16))
    writer.add_head_count_kv(max(1, embedding_length // 16))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_TOKENS)
    writer.add_token_scores([float(-i) for i in range(len(_TOKENS))])
    writer.add_token_types([2, 3, 3, 3] + [1] * (len(_TOKENS) - 4))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for tensor_name, shape, dtype in plan:
        writer.add_tensor_info(tensor_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())  # the data section starts aligned
    writer.close()

    alignment = writer.data_alignment
    rng = np.random.default_rng(seed)
    with path.open("r+b") as fh:
        out = _HashingWriter(fh)
        while True:  # hash the header written by GGUFWriter (small), then append the data
            piece = fh.read(WRITE_CHUNK)
            if not piece:
                break
            out.sha.update(piece)
            out.size += len(piece)
        tensor_bytes = 0
        for _, shape, dtype in plan:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            left = nbytes
            while left > 0:
                piece_len = min(left, WRITE_CHUNK)
                out.write(_fill_bytes(rng, piece_len, fill, dtype))
                left -= piece_len
            tensor_bytes += nbytes
            pad = -nbytes % alignment
            if pad:
                out.write(bytes(pad))
    return GGUFFile(path, "sha256:" + out.sha.hexdigest(), out.size, n_params, tensor_bytes)


_WORDS = (
    "hello",
    "world",
    "mirror",
    "cache",
    "blob",
    "pull",
    "model",
    "fast",
    "disk",
    "bytes",
    "once",
    "here",
)


def make_runnable_gguf(path: Path | str, *, name: str = "tiny", seed: int = 0) -> GGUFFile:
    """Write a complete tiny llama (about 110 KiB) that llama.cpp, and so ``ollama run``, loads and runs.

    One transformer block (32-wide, 2 heads, F32 weights drawn from ``seed``) and a SentencePiece-style
    vocabulary of the 256 byte tokens plus ``<unk>``, ``<s>``, ``</s>``, letters and a few words, so that any
    prompt tokenizes; the output layer only ever favours the words. The text it generates is a random walk
    through them and never ends by itself: a test sets ``num_predict`` and checks that tokens stream.
    """
    path = Path(path)
    n_embd, n_ff, n_head, context = 32, 64, 2, 256
    rng = np.random.default_rng(seed)
    words = (
        ["\u2581" + w for w in _WORDS]
        + [".", ",", "\u2581"]
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    )
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    token_types = [2, 3, 3] + [6] * 256 + [1] * len(words)  # unknown, control, byte, normal
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_description(f"ollama-mirror runnable test model, seed {seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(context)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (len(tokens), n_embd),
        "output_norm.weight": (n_embd,),
        "output.weight": (len(tokens), n_embd),
        "blk.0.attn_norm.weight": (n_embd,),
        "blk.0.attn_q.weight": (n_embd, n_embd),
        "blk.0.attn_k.weight": (n_embd, n_embd),
        "blk.0.attn_v.weight": (n_embd, n_embd),
        "blk.0.attn_output.weight": (n_embd, n_embd),
        "blk.0.ffn_norm.weight": (n_embd,),
        "blk.0.ffn_gate.weight": (n_ff, n_embd),
        "blk.0.ffn_up.weight": (n_ff, n_embd),
        "blk.0.ffn_down.weight": (n_embd, n_ff),
    }
    n_params = 0
    for tensor_name, shape in shapes.items():
        if tensor_name.endswith("norm.weight"):
            values = np.ones(shape, dtype=np.float32)
        else:
            values = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if tensor_name == "output.weight":  # only words come out: no stray bytes (invalid UTF-8), no end
            values[:259] = 0.0
            values[259:] *= 15.0
        writer.add_tensor(tensor_name, values)
        n_params += values.size
    writer.add_uint64("general.parameter_count", n_params)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return GGUFFile(path, digest, len(data), n_params, n_params * 4)


# --- whole models ---------------------------------------------------------------------------------


def build_model(
    workdir: Path | str,
    *,
    size: int = SMALL_MODEL_SIZE,
    seed: int = 0,
    name: str = "tiny",
    arch: str = "llama",
    context_length: int = 2048,
    fill: Fill = "random",
    template: str = DEFAULT_TEMPLATE,
    params: Mapping[str, Any] | None = None,
    license_text: str | None = DEFAULT_LICENSE,
    system: str | None = None,
    runnable: bool = False,
) -> BuiltModel:
    """Build an Ollama model whose GGUF holds about ``size`` bytes of tensor data (``runnable``: the
    complete tiny llama of :func:`make_runnable_gguf` instead, whatever ``size``, which ``ollama run`` runs).

    Blobs go to ``workdir/blobs/sha256-<hex>`` (a models-directory layout, so models built into the same
    workdir share blobs). Layers, in ``ollama create`` order: model (GGUF), template, license (unless None),
    system (if given), params; then the config blob (``model_format``, ``model_family``, ``model_type``,
    ``file_type``, ``rootfs.diff_ids``…) and the manifest, both compact JSON as Go writes them. The GGUF, the
    config and the manifest change with ``seed``; template, params and license are the same for all models
    unless given, so two models share those blobs — as many models on ``registry.ollama.ai`` share theirs.
    """
    workdir = Path(workdir)
    blobs_dir = workdir / "blobs"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=blobs_dir, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    if runnable and params is None:
        params = {"num_predict": 24}  # the tiny llama never ends by itself: let `ollama run` finish
    if runnable:
        gguf_file = make_runnable_gguf(tmp_name, name=name, seed=seed)
    else:
        gguf_file = make_gguf(
            tmp_name,
            arch=arch,
            n_params_bytes=size,
            context_length=context_length,
            name=name,
            seed=seed,
            fill=fill,
        )
    gguf_path = _publish(Path(tmp_name), blobs_dir, gguf_file.digest.split(":", 1)[1])
    layers = [Blob(MEDIA_MODEL, gguf_file.digest, gguf_file.size, gguf_path)]
    layers.append(write_blob(blobs_dir, MEDIA_TEMPLATE, template.encode()))
    if license_text is not None:
        layers.append(write_blob(blobs_dir, MEDIA_LICENSE, license_text.encode()))
    if system is not None:
        layers.append(write_blob(blobs_dir, MEDIA_SYSTEM, system.encode()))
    layers.append(write_blob(blobs_dir, MEDIA_PARAMS, go_json(dict(params or DEFAULT_PARAMS))))

    config_data: dict[str, Any] = {
        "model_format": "gguf",
        "model_family": arch,
        "model_families": [arch],
        "model_type": human_number(gguf_file.n_params),
        "file_type": "F32" if runnable else "F16",
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in layers]},
    }
    config = write_blob(blobs_dir, CONFIG_V1, go_json(config_data))
    manifest = go_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": config.descriptor(),
            "layers": [blob.descriptor() for blob in layers],
        }
    )
    return BuiltModel(
        manifest=manifest,
        digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
        config=config,
        config_data=config_data,
        layers=tuple(layers),
        n_params=gguf_file.n_params,
    )


# --- synchronous HTTP -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    incomplete: bool = False  # the connection closed before Content-Length bytes arrived

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class PushReport:
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class PushError(RuntimeError):
    pass


def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | BinaryIO | None = None,
    content_length: int | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Response:
    """One plain HTTP/1.1 request (no redirects followed, the whole response body read).

    ``body`` may be an open binary file, streamed in 1 MiB pieces (give ``content_length``).
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs are supported: {url}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout, blocksize=MiB)
    try:
        request_headers = dict(headers or {})
        if content_length is not None:
            request_headers["Content-Length"] = str(content_length)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn.request(method, target, body=body, headers=request_headers)
        response = conn.getresponse()
        response_headers = {k.lower(): v for k, v in response.getheaders()}
        try:
            data = response.read()
        except http.client.IncompleteRead as exc:  # e.g. the registry's 416 (see tests/support/registry.py)
            return Response(response.status, response_headers, exc.partial, incomplete=True)
        return Response(response.status, response_headers, data)
    finally:
        conn.close()


def _check(response: Response, expected: tuple[int, ...], what: str) -> Response:
    if response.status not in expected:
        raise PushError(f"{what}: HTTP {response.status} {response.body[:500]!r}")
    return response


def blob_exists(registry_url: str, repo: str, digest: str, headers: Mapping[str, str] | None = None) -> bool:
    response = http_request("HEAD", f"{registry_url}/v2/{repo}/blobs/{digest}", headers=headers)
    return response.status == 200


def push_blob(registry_url: str, repo: str, blob: Blob, headers: Mapping[str, str] | None = None) -> bool:
    """Upload one blob (monolithic: POST then PUT with the whole body); False if it was already there."""
    if blob_exists(registry_url, repo, blob.digest, headers):
        return False
    started = _check(
        http_request("POST", f"{registry_url}/v2/{repo}/blobs/uploads/", headers=headers, content_length=0),
        (202,),
        f"start upload of {blob.digest}",
    )
    location = started.header("location")
    if not location:
        raise PushError(f"start upload of {blob.digest}: no Location header")
    upload_url = urljoin(registry_url + "/", location)
    upload_url += ("&" if "?" in upload_url else "?") + "digest=" + blob.digest
    put_headers = {**(headers or {}), "Content-Type": "application/octet-stream"}
    with blob.path.open("rb") as fh:
        _check(
            http_request("PUT", upload_url, headers=put_headers, body=fh, content_length=blob.size),
            (201,),
            f"upload of {blob.digest}",
        )
    return True


def get_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    *,
    accept: str | None = MANIFEST_V2,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
) -> Response:
    """``GET /v2/<repo>/manifests/<reference>`` with the v2 Accept header (``accept=None`` sends none)."""
    request_headers = dict(headers or {})
    if accept is not None:
        request_headers["Accept"] = accept
    return http_request(method, f"{registry_url}/v2/{repo}/manifests/{reference}", headers=request_headers)


def delete_manifest(
    registry_url: str, repo: str, digest: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Delete a manifest by digest (the registry cannot delete by tag); the blobs stay until GC."""
    return http_request("DELETE", f"{registry_url}/v2/{repo}/manifests/{digest}", headers=headers)


def push_model(
    registry_url: str,
    repo: str,
    tag: str,
    model: BuiltModel,
    *,
    headers: Mapping[str, str] | None = None,
    verify: bool = True,
) -> PushedModel:
    """Push every blob (skipping those the repository has) then the manifest as ``repo:tag``.

    With ``verify`` (the default), checks that the registry now serves exactly the manifest bytes with
    ``Docker-Content-Digest`` equal to their sha256, and every blob with its exact ``Content-Length``.
    ``headers`` are added to every request (e.g. ``RegistryProcess.auth_headers()``).
    """
    registry_url = registry_url.rstrip("/")
    for blob in model.blobs:
        push_blob(registry_url, repo, blob, headers)
    put_headers = {**(headers or {}), "Content-Type": MANIFEST_V2}
    stored = _check(
        http_request(
            "PUT",
            f"{registry_url}/v2/{repo}/manifests/{tag}",
            headers=put_headers,
            body=model.manifest,
        ),
        (201,),
        f"push of manifest {repo}:{tag}",
    )
    if stored.header("docker-content-digest") != model.digest:
        got = stored.header("docker-content-digest")
        raise PushError(f"registry stored {repo}:{tag} as {got}, expected {model.digest}")
    pushed = PushedModel(
        **{f.name: getattr(model, f.name) for f in fields(BuiltModel)},
        registry_url=registry_url,
        repo=repo,
        tag=tag,
    )
    if verify:
        verify_pushed(pushed, headers)
    return pushed


def verify_pushed(model: PushedModel, headers: Mapping[str, str] | None = None) -> None:
    """Raise :class:`PushError` unless the registry serves ``model`` exactly."""
    got = _check(
        get_manifest(model.registry_url, model.repo, model.tag, headers=headers), (200,), f"GET {model.name}"
    )
    if got.body != model.manifest:
        raise PushError(f"{model.name}: the registry serves different manifest bytes")
    if got.header("docker-content-digest") != model.digest:
        raise PushError(f"{model.name}: Docker-Content-Digest {got.header('docker-content-digest')}")
    for blob in model.blobs:
        head = http_request("HEAD", model.blob_url(blob.digest), headers=headers)
        if head.status != 200 or head.header("content-length") != str(blob.size):
            raise PushError(
                f"{model.name}: blob {blob.digest} is HTTP {head.status}, "
                f"Content-Length {head.header('content-length')!r}, expected {blob.size}"
            )


def build_and_push(
    workdir: Path | str,
    registry_url: str,
    repo: str,
    tag: str = "latest",
    *,
    headers: Mapping[str, str] | None = None,
    **build_args: Any,
) -> PushedModel:
    """:func:`build_model` then :func:`push_model`."""
    return push_model(registry_url, repo, tag, build_model(workdir, **build_args), headers=headers)


def copy_blob_to(blob: Blob, directory: Path) -> Path:
    """Copy a blob into ``directory/sha256-<hex>`` (to seed a models directory by hand)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / blob.cache_name
    shutil.copyfile(blob.path, target)
    return target
