"""Server settings: environment variables with the GR2_ prefix, overridable by CLI flags."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServerSettings(BaseSettings):
    """Everything `gr2-policy-server serve` can be told. Defaults serve locally only."""

    model_config = SettingsConfigDict(env_prefix="GR2_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind gRPC and HTTP to")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port: REST, /metrics, health")
    redis_url: str | None = Field(None, description="redis://... episode store; unset = in-process")
    checkpoint: Path | None = Field(
        None,
        description="directory with config.json + model.safetensors; unset = the bundled "
        "demo checkpoint (gr2_policy/checkpoints/demo)",
    )
    random_weights: bool = Field(
        False, description="serve seeded random weights of `preset` instead (no checkpoint)"
    )
    preset: str = Field("gr2-tiny", description="preset of the random weights")
    seed: int = Field(0, description="seed of the random weights")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    malloc_tuning: bool = Field(
        True,
        description="on CPU, raise glibc's mmap/trim thresholds so batches reuse memory "
        "instead of page-faulting fresh allocations (~12% faster batches on gr2-tiny)",
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads (0 = torch default)")
    kv_cache: bool = Field(
        True,
        description="KV-cached incremental steps; off recomputes the last R steps each step "
        "(same results, for debugging and benchmarks)",
    )
    runner: Literal["eager", "compile", "onnx", "tensorrt"] = Field(
        "eager",
        description="what runs the step: eager PyTorch, torch.compile (CUDA graphs on GPU), "
        "ONNX Runtime, or a TensorRT engine (GPU)",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compute precision; bf16/fp16 need a GPU"
    )
    kv_pool_bytes: int = Field(
        0,
        ge=0,
        description="KV-cache pool budget in bytes; 0 = kv_pool_gpu_fraction of free GPU "
        "memory on CUDA, 256 MiB on CPU",
    )
    kv_pool_gpu_fraction: float = Field(
        0.5, gt=0, le=0.95, description="share of free GPU memory for the KV pool (when bytes=0)"
    )
    kv_cache_dtype: Literal["fp32", "bf16", "fp16", "fp8"] = Field(
        "fp32", description="storage type of the KV pool (computation upcasts)"
    )
    max_batch_size: int = Field(32, ge=1, le=256, description="control steps per forward, at most")
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="how long a control step may wait for others to join its batch",
    )
    video_tokens_per_unit: int = Field(
        16,
        ge=1,
        description="video tokens generated between two chances for control steps to run",
    )
    engine_cache_dir: Path | None = Field(
        None, description="where ONNX exports and TensorRT engines are cached (~/.cache/gr2)"
    )
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="gRPC message limit")
    max_upload_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="REST request body limit (larger: 413)"
    )
    replica: str = Field(default_factory=socket.gethostname, description="name of this replica")
    episode_ttl_s: float = Field(86400.0, gt=0, description="episode state TTL in the store")
    shutdown_grace_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="on SIGTERM, the longest the drain and shutdown may take (keep the "
        "Kubernetes terminationGracePeriodSeconds above it)",
    )
    drain_min_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="on SIGTERM, keep answering NOT_SERVING/UNAVAILABLE at least this long "
        "before closing the ports (time for load balancers to notice; 5 s on Kubernetes)",
    )
    log_level: str = Field("info", description="debug, info, warning, error")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable)")
    # Access control and transport security (docs/security.md). Keys are secrets: SecretStr
    # keeps them out of repr() and logs; their format is checked by api.auth.KeyRing.parse,
    # never here, because a pydantic error would echo the raw value.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated API keys, each KEY or NAME:KEY; when set, every "
        "PolicyService RPC and REST route but health, metrics and the page needs "
        "'authorization: Bearer KEY' (unset: no authentication)",
    )
    rate_limit_rps: float = Field(
        0.0,
        ge=0,
        description="requests per second per API key (per client address without keys); "
        "each StreamActions observation counts; 0 = no limit",
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="bucket size: requests allowed at once; 0 = ceil(rps), at least 1"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain) for gRPC TLS; needs tls_key_file"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle: mutual TLS, clients must present a certificate it signed",
    )
    health_port: int = Field(
        50052,
        ge=0,
        le=65535,
        description="with TLS on: plaintext port serving only grpc.health.v1, for probes "
        "that cannot speak TLS (0 = any free port)",
    )

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("checkpoint", "engine_cache_dir", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``GR2_API_KEYS=a,b`` (a comma-separated list, not JSON); blanks are dropped."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file", mode="before")
    @classmethod
    def _empty_tls_path_is_none(cls, value: object) -> object:
        return None if value == "" else value
