"""Runs the policy server: gRPC (grpc.aio) and HTTP (uvicorn/FastAPI) in one event loop.

Startup order: load weights, start gRPC (health NOT_SERVING) and HTTP (/readyz 503), warm the
engine up, then flip both to serving. On SIGTERM/SIGINT: stop being ready, let in-flight RPCs
finish within the grace period, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn

from gr2_policy.allocator import tune_glibc_malloc
from gr2_policy.api.grpc_server import GrpcServer
from gr2_policy.api.rest import Readiness, create_app
from gr2_policy.api.service import EpisodeService
from gr2_policy.logs import get_logger
from gr2_policy.metrics import PolicyMetrics
from gr2_policy.settings import ServerSettings
from gr2_policy.state import make_store

log = get_logger("gr2_policy.server")
SHUTDOWN_GRACE_S = 5.0


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
    engine, source = await asyncio.to_thread(build_engine, settings, metrics)
    store = make_store(
        settings.redis_url,
        replica=settings.replica,
        ttl_s=settings.episode_ttl_s,
        history_cap=engine.info.rebuild_steps,
    )
    service = EpisodeService(engine, store, metrics, replica=settings.replica)
    grpc_server = GrpcServer(service, settings.host, settings.grpc_port, settings.max_message_bytes)
    await grpc_server.start()
    readiness = Readiness()
    http = _EmbeddedUvicorn(
        uvicorn.Config(
            create_app(service, readiness, max_upload_bytes=settings.max_upload_bytes),
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
            http=f"{settings.host}:{settings.http_port}",
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
        log.info("shutting_down", grace_s=SHUTDOWN_GRACE_S)
        readiness.draining = True
        await grpc_server.stop(SHUTDOWN_GRACE_S)
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, SHUTDOWN_GRACE_S)
        await engine.stop()
        await store.close()
        log.info("stopped")
