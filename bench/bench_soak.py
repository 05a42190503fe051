"""Soak: a bounded mixed load for a while, with zero unexpected errors and flat memory.

    .venv/bin/python bench/bench_soak.py [--seconds 600] [--out FILE]

One server (the embedded MiniLM for encode and bi-encoder score, a tiny cross-encoder for score
and a tiny GLiNER for extract, built here with random weights) and one bridge, as processes.
Clients of ``SIEAsyncClient`` on both transports call encode, score and extract with 1-8 items
each, in closed loops. A share of the calls is made to fail on purpose:

- deadlines: a timeout shorter than the call can take (expected: ``DEADLINE_EXCEEDED``);
- cancellations: the caller gives up after a random few milliseconds (expected: cancelled).

Any other failure is unexpected, and so is a result of the wrong shape. RSS of the server and
the bridge is sampled every second; its growth is the median of the last tenth of the run over
the median of the tenth after warm-up (the first quarter, at most 60 s). Exit status 1 when an
unexpected error occurred or either process grew by 5% or more (``--rss-limit``). The result is JSON:
bench/results/soak-<time>.json, or ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from bench_common import HOST, MODEL, ROOT
from bench_services import Service, bridge, free_port
from sie_sdk import SIEAsyncClient
from sie_sdk.client.errors import SIEError
from sie_sdk.types import Item

# The tests' builders of tiny random-weight models (imported by name: they are not typed code).
sys.path.insert(0, str(ROOT))
classifiers: Any = importlib.import_module("tests.tiny_models.classifiers")
gliner: Any = importlib.import_module("tests.tiny_models.gliner")
entries: Any = importlib.import_module("tests.tiny_models.entries")

RERANKER = "soak/cross-encoder"
EXTRACTOR = "soak/gliner"
LABELS = ["person", "place", "organization"]
WORDS = [
    *("search", "inference", "engine", "serves", "embeddings", "sparse", "multivector"),
    *("rerank", "extract", "entities", "Paris", "London", "Ada", "Lovelace", "Alan"),
    *("Turing", "organisation", "model", "batch", "token", "latency"),
]
#: Growth of RSS (last tenth over the tenth after warm-up) that fails the soak.
RSS_GROWTH_LIMIT = 0.05


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))


def build_catalog(folder: Path) -> Path:
    """A catalog folder with the tiny reranker and extractor (random weights)."""
    import yaml

    catalog = folder / "catalog"
    catalog.mkdir(parents=True)
    specs = [
        entries.entry(
            RERANKER,
            "cross_encoder",
            classifiers.build_bert_classifier(folder / "reranker"),
            entries.SCORE_OUTPUTS,
        ),
        entries.entry(
            EXTRACTOR, "gliner", gliner.build_tiny_gliner(folder / "gliner"), entries.JSON_OUTPUTS
        ),
    ]
    for spec in specs:
        name = str(spec["name"]).replace("/", "__")
        (catalog / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return catalog


def start_server(catalog: Path) -> tuple[Service, str]:
    from sie_server.catalog import BUILTIN_CATALOG_DIR

    port = free_port()
    server = Service(
        "sie-server",
        [
            sys.executable, "-m", "sie_server", "--host", HOST, "--port", str(port),
            "--device", "cpu", "--models-dir", str(BUILTIN_CATALOG_DIR),
            "--models-dir", str(catalog), "--preload", MODEL, "--preload", RERANKER,
            "--preload", EXTRACTOR,
        ],
        {**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return server, f"{HOST}:{port}"


async def wait_serving(address: str, timeout_s: float = 300.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the server at {address} never became SERVING")


class Tally:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.examples: list[str] = []

    def unexpected_error(self, kind: str, what: str) -> None:
        self.unexpected[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")


class WrongResult(Exception):
    """A call succeeded with a result of the wrong shape."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise WrongResult(what)


async def one_call(client: SIEAsyncClient, rng: random.Random, kind: str) -> None:
    """One call of ``kind``; raises on failure, WrongResult on a result of the wrong shape."""
    n = rng.randint(1, 8)
    if kind == "encode":
        results = await client.encode(MODEL, [Item(text=text(rng)) for _ in range(n)])
        if not isinstance(results, list) or len(results) != n:
            raise WrongResult(f"{n} encode results expected")
        expect(all(r["dense"].shape == (384,) for r in results), "384-dim vectors")
    elif kind == "score":
        model = rng.choice([RERANKER, MODEL])
        scored = await client.score(
            model, Item(text=text(rng)), [Item(text=text(rng)) for _ in range(n)]
        )
        expect(len(scored["scores"]) == n, f"{n} scores")
    else:
        extracted = await client.extract(
            EXTRACTOR, [Item(text=text(rng)) for _ in range(n)], labels=LABELS
        )
        expect(isinstance(extracted, list) and len(extracted) == n, f"{n} extract results")


async def worker(url: str, transport: str, seed: int, stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    normal = SIEAsyncClient(url, transport=transport, timeout_s=60.0)
    hurried = SIEAsyncClient(url, transport=transport, timeout_s=0.005)
    try:
        while time.monotonic() < stop_at:
            kind = rng.choice(["encode", "encode", "score", "extract"])
            fate = rng.random()
            label = f"{transport}/{kind}"
            try:
                if fate < 0.05:  # a deadline the call cannot meet
                    try:
                        await one_call(hurried, rng, kind)
                        tally.ok[label] += 1
                    except SIEError as exc:
                        if exc.code != "DEADLINE_EXCEEDED":
                            raise
                        tally.expected[f"{label}/deadline"] += 1
                elif fate < 0.10:  # the caller gives up mid-call
                    task = asyncio.ensure_future(one_call(normal, rng, kind))
                    await asyncio.sleep(rng.uniform(0.001, 0.05))
                    if task.done():
                        task.result()
                        tally.ok[label] += 1
                    else:
                        task.cancel()
                        try:
                            await task
                            tally.ok[label] += 1
                        except asyncio.CancelledError:
                            tally.expected[f"{label}/cancelled"] += 1
                else:
                    await one_call(normal, rng, kind)
                    tally.ok[label] += 1
            except WrongResult as exc:
                tally.unexpected_error(label, f"wrong result: {exc}")
            except Exception as exc:  # every other failure is what the soak looks for
                tally.unexpected_error(label, f"{type(exc).__name__}: {exc}")
    finally:
        await normal.close()
        await hurried.close()


async def sample_rss(pids: dict[str, int], stop_at: float, into: dict[str, list[float]]) -> None:
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    while time.monotonic() < stop_at:
        for name, process in processes.items():
            into[name].append(process.memory_info().rss / 2**20)
        await asyncio.sleep(1.0)


def growth(samples: list[float], warmup_share: float) -> float:
    """Median of the last tenth over the median of the tenth right after warm-up."""
    n = len(samples)
    start = int(n * warmup_share)
    tenth = max(1, n // 10)
    base = statistics.median(samples[start : start + tenth])
    last = statistics.median(samples[-tenth:])
    return last / base - 1.0


async def run(grpc_address: str, http_url: str, pids: dict[str, int], seconds: float) -> Any:
    tally = Tally()
    rss: dict[str, list[float]] = {name: [] for name in pids}
    stop_at = time.monotonic() + seconds
    clients = [
        worker(f"grpc://{grpc_address}", "grpc", seed, stop_at, tally) for seed in range(4)
    ] + [worker(http_url, "http", 100 + seed, stop_at, tally) for seed in range(4)]
    started = time.monotonic()
    await asyncio.gather(sample_rss(pids, stop_at, rss), *clients)
    elapsed = time.monotonic() - started
    warmup_share = min(0.25, 60.0 / seconds)
    return tally, rss, elapsed, warmup_share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--rss-limit",
        type=float,
        default=RSS_GROWTH_LIMIT,
        help="RSS growth that fails the soak (default 0.05; short runs need more room: a model's "
        "largest batch may come late)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sie-soak-") as tmp:
        catalog = build_catalog(Path(tmp))
        server, grpc_address = start_server(catalog)
        front = None
        try:
            asyncio.run(wait_serving(grpc_address))
            front = bridge(grpc_address)
            front.wait_ready()
            pids = {"server": server.pid, "bridge": front.pid}
            tally, rss, elapsed, warmup_share = asyncio.run(
                run(grpc_address, front.base_url, pids, args.seconds)
            )
        finally:
            if front is not None:
                front.stop()
            server_exit = server.stop()
    growths = {name: growth(samples, warmup_share) for name, samples in rss.items()}
    result = {
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "calls_ok": sum(tally.ok.values()),
        "calls_per_s": round(sum(tally.ok.values()) / elapsed, 1),
        "ok": dict(sorted(tally.ok.items())),
        "expected_failures": dict(sorted(tally.expected.items())),
        "unexpected_errors": sum(tally.unexpected.values()),
        "unexpected_by_call": dict(sorted(tally.unexpected.items())),
        "unexpected_examples": tally.examples,
        "rss_mb": {
            name: {"start": round(s[int(len(s) * warmup_share)], 1), "end": round(s[-1], 1)}
            for name, s in rss.items()
        },
        "rss_growth": {name: round(g, 4) for name, g in growths.items()},
        "rss_mb_every_10s": {name: [round(v) for v in s[::10]] for name, s in rss.items()},
        "server_exit_code": server_exit,
    }
    passed = result["unexpected_errors"] == 0 and all(g < args.rss_limit for g in growths.values())
    result["passed"] = passed
    out = args.out or ROOT / "bench/results" / f"soak-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
