"""Runs the policy server: gRPC (grpc.aio) and HTTP (uvicorn/FastAPI) in one event loop.

Startup order: load weights, start gRPC (health NOT_SERVING) and HTTP (/readyz 503), warm the
engine up, then flip both to serving. On SIGTERM/SIGINT: drain (``_drain``): NOT_SERVING, new
work refused with UNAVAILABLE, action streams told to move to another replica, exit within the
grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn

from gr2_policy.allocator import tune_glibc_malloc
from gr2_policy.api.auth import AccessGuard
from gr2_policy.api.grpc_server import GrpcServer
from gr2_policy.api.rest import Readiness, create_app
from gr2_policy.api.service import EpisodeService
from gr2_policy.api.tls import load_server_tls
from gr2_policy.logs import get_logger
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.settings import ServerSettings
from gr2_policy.state import make_store

log = get_logger("gr2_policy.server")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: this process installs the handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_engine(settings: ServerSettings, metrics: PolicyMetrics):  # type: ignore[no-untyped-def]
    """Load the checkpoint (or seeded random weights) into the batching engine (or, with
    the KV cache off, the one-episode-at-a-time recomputing engine)."""
    import torch

    from gr2_policy.checkpoints import bundled_demo_checkpoint
    from gr2_policy.engine.batching import BatchingEngine, EngineConfig
    from gr2_policy.engine.local import LocalEngine
    from gr2_policy.model.checkpoint import init_random_policy, load_checkpoint

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.malloc_tuning and settings.device == "cpu":
        log.info("malloc_tuning", applied=tune_glibc_malloc())
    checkpoint, device = settings.checkpoint, settings.device
    if checkpoint is None and not settings.random_weights:
        checkpoint = bundled_demo_checkpoint()
        if checkpoint is not None:
            log.info("bundled_checkpoint", checkpoint=str(checkpoint))
    if checkpoint is not None:
        source = str(checkpoint)

        def factory() -> Any:
            return load_checkpoint(checkpoint, device=device)
    else:
        preset, seed = settings.preset, settings.seed
        source = f"random {preset} weights (seed {seed})"
        log.warning(
            "no_checkpoint",
            message="serving RANDOMLY INITIALISED weights (GR2_RANDOM_WEIGHTS, or no "
            "checkpoint is bundled with this install). Set GR2_CHECKPOINT (or --checkpoint) "
            "to a directory with config.json + model.safetensors.",
        )

        def factory() -> Any:
            return init_random_policy(preset, seed=seed)

    # The factory runs on the engine's worker thread: a model built on another thread slows
    # every step (~25 ms vs ~16 ms for gr2-tiny on 2 cores; see engine/local.py).
    if not settings.kv_cache:
        return LocalEngine(factory, device=device, kv_cache=False, metrics=metrics), source
    config = EngineConfig(
        device=device,
        runner=settings.runner,
        precision=settings.precision,
        kv_pool_bytes=settings.kv_pool_bytes,
        kv_pool_gpu_fraction=settings.kv_pool_gpu_fraction,
        kv_cache_dtype=settings.kv_cache_dtype,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        video_tokens_per_unit=settings.video_tokens_per_unit,
        engine_cache_dir=None
        if settings.engine_cache_dir is None
        else str(settings.engine_cache_dir),
    )
    return BatchingEngine(factory, config, metrics=metrics), source


async def serve(settings: ServerSettings, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    metrics = PolicyMetrics()
    # Keys and TLS files are checked before the model loads: a bad setting fails at once.
    guard = AccessGuard.from_settings(settings, metrics)
    tls = load_server_tls(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )
    guard.log_startup(settings.host, tls_on=tls is not None)
    engine, source = await asyncio.to_thread(build_engine, settings, metrics)
    store = make_store(
        settings.redis_url,
        replica=settings.replica,
        ttl_s=settings.episode_ttl_s,
        history_cap=engine.info.rebuild_steps,
    )
    service = EpisodeService(engine, store, metrics, replica=settings.replica)
    grpc_server = GrpcServer(
        service,
        settings.host,
        settings.grpc_port,
        settings.max_message_bytes,
        guard=guard,
        tls=tls,
        health_port=settings.health_port,
    )
    await grpc_server.start()
    readiness = Readiness()
    http = _EmbeddedUvicorn(
        uvicorn.Config(
            create_app(service, readiness, max_upload_bytes=settings.max_upload_bytes, guard=guard),
            host=settings.host,
            port=settings.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
    )
    http_task = asyncio.create_task(http.serve(), name="http")
    try:
        await engine.start()
        readiness.ready = True
        await grpc_server.set_serving(True)
        log.info(
            "serving",
            grpc=f"{settings.host}:{grpc_server.port}",
            grpc_security=grpc_server.security,
            grpc_plaintext_health=None
            if grpc_server.health_port is None
            else f"{settings.host}:{grpc_server.health_port}",
            http=f"{settings.host}:{settings.http_port}",
            **guard.describe(),
            model=source,
            preset=engine.info.preset,
            model_version=engine.info.model_version,
            store="redis" if settings.redis_url else "memory",
            kv_cache=settings.kv_cache,
            runner=settings.runner if settings.kv_cache else "recompute",
        )
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task in done and http_task.exception() is not None:
            raise RuntimeError("HTTP server failed") from http_task.exception()
        stop_task.cancel()
    finally:
        await _drain(settings, service, grpc_server, readiness)
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, 1.0)
        await engine.stop()
        await store.close()
        log.info("stopped")


async def _drain(
    settings: ServerSettings,
    service: EpisodeService,
    grpc_server: GrpcServer,
    readiness: Readiness,
) -> None:
    """Graceful shutdown, bounded by ``shutdown_grace_s``: go NOT_SERVING (gRPC health and
    /readyz), refuse new episodes and steps with UNAVAILABLE, end every action stream with
    UNAVAILABLE so its robot continues on another replica (a step in progress is answered
    first), keep answering that way for at least ``drain_min_s`` (so load balancers and
    probes see it), then stop gRPC, cancelling whatever is still running at the deadline."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + settings.shutdown_grace_s
    keep_until = start + min(settings.drain_min_s, settings.shutdown_grace_s)
    log.info(
        "draining",
        grace_s=settings.shutdown_grace_s,
        drain_min_s=settings.drain_min_s,
        open_streams=grpc_server.servicer.open_streams,
    )
    readiness.draining = True
    service.start_draining()
    await grpc_server.set_serving(False)
    while loop.time() < deadline and (
        grpc_server.servicer.open_streams > 0 or loop.time() < keep_until
    ):
        await asyncio.sleep(0.02)
    remaining = max(0.0, deadline - loop.time())
    log.info(
        "stopping_grpc",
        open_streams=grpc_server.servicer.open_streams,
        remaining_s=round(remaining, 3),
    )
    await grpc_server.stop(remaining)
