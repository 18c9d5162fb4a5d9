"""Serving overhead of the policy server over gRPC on loopback.

Starts a real `gr2-policy-server` process (in-process store, gr2-tiny random weights), then
sends observations carrying the served views as raw RGB frames, one at a time, through
`Act` (unary) and through one `StreamActions` stream. Per step it records the client's round
trip and the server-reported model time (queue + compute). It prints JSON: percentiles of
each and of the overhead = round trip - (queue + compute), the time spent outside the model
(serialisation, validation, gRPC, the event loop, the episode store).
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from gr2_client import PolicyClient, make_observation

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1e3
    return {f"p{q}_ms": round(float(np.percentile(arr, q)), 3) for q in (50, 90, 99)}


def run_unary(client: PolicyClient, images: dict, steps: int) -> tuple[list, list]:
    episode = client.start_episode("bench unary")
    rtt, model = [], []
    for seq in range(steps):
        obs = make_observation(
            episode, seq, images, [0.45, 0, 0.3], [0, 1, 0, 0], 0.0, capture_time_s=seq * 0.2
        )
        t0 = time.perf_counter()
        chunk = client.act(obs)
        rtt.append(time.perf_counter() - t0)
        model.append(chunk.queue_time_s + chunk.compute_time_s)
    client.end_episode(episode)
    return rtt, model


def run_stream(client: PolicyClient, images: dict, steps: int) -> tuple[list, list]:
    episode = client.start_episode("bench stream")
    outbox: queue.Queue = queue.Queue()
    sent_at: dict[int, float] = {}

    def observations():  # type: ignore[no-untyped-def]
        for seq in range(steps):
            obs = outbox.get()
            sent_at[seq] = time.perf_counter()
            yield obs

    rtt, model = [], []
    stream = client.stream_actions(observations())
    for seq in range(steps):
        outbox.put(
            make_observation(
                episode, seq, images, [0.45, 0, 0.3], [0, 1, 0, 0], 0.0, capture_time_s=seq * 0.2
            )
        )
        chunk = next(stream)
        rtt.append(time.perf_counter() - sent_at[seq])
        model.append(chunk.queue_time_s + chunk.compute_time_s)
    client.end_episode(episode)
    return rtt, model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    grpc_port, http_port = free_port(), free_port()
    server = subprocess.Popen(
        [
            str(BIN / "gr2-policy-server"),
            "serve",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--torch-threads",
            str(args.torch_threads),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not become ready") from None
                time.sleep(0.2)
        with PolicyClient(f"127.0.0.1:{grpc_port}") as client:
            info = client.server_info()
            rng = np.random.default_rng(0)
            images = {n: rng.integers(0, 256, (h, w, 3), np.uint8) for n, w, h in info.views}
            run_unary(client, images, args.warmup)
            result: dict = {
                "benchmark": "serving_overhead",
                "preset": info.preset,
                "views": [f"{n} {w}x{h} RAW_RGB8" for n, w, h in info.views],
                "payload_bytes": sum(img.nbytes for img in images.values()),
                "steps": args.steps,
            }
            for name, fn in (("act", run_unary), ("stream", run_stream)):
                rtt, model = fn(client, images, args.steps)
                overhead = [r - m for r, m in zip(rtt, model, strict=True)]
                result[name] = {
                    "round_trip": percentiles(rtt),
                    "model": percentiles(model),
                    "overhead": percentiles(overhead),
                    "overhead_share_of_round_trip_p50": round(
                        float(np.median(overhead) / np.median(rtt)), 4
                    ),
                }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
