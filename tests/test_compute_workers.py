"""The shared compute lane's two workers (engine/compute_lane.py, ``--compute-workers``): a job
put to an idle lane runs alone on all the lane's threads; jobs put while it is busy run side by
side, one thread each; a job that must run alone (a call, a pass of a model whose passes may not
overlap) waits for the others and nothing starts beside it; jobs never overtake. And through
the registry: a model whose passes may overlap gets two batches running at once, with the same
results as one at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc
from sie_server.config import Settings, load_settings
from sie_server.device import Placement, compute_layout
from sie_server.domain import InputItem
from sie_server.engine.compute_lane import ComputeLane
from sie_server.errors import LoraLoading
from sie_server.grpc_api.server import build_registry
from sie_server.tasks.encode import EncodeCall, EncodeSettings

from tests.fakes import FakeAdapter, ForwardPass
from tests.server_utils import (
    HANG_GUARD_S,
    eventually,
    fake_adapter,
    fake_entry,
    fake_model_server,
    write_catalog_entry,
)
from tests.tiny_models import dense
from tests.tiny_models.entries import DENSE_OUTPUTS, entry
from tests.tiny_models.lora import build_lora, cosines

DOCS = EncodeSettings(output_types=("dense",))


class Recorder:
    """Jobs that note where and on how many torch threads they ran, each parked on a gate."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str, int]] = []  # (job, thread, torch threads)
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def job(self, name: str, *, parked: bool = False) -> Callable[[], None]:
        gate = self.gates.setdefault(name, threading.Event())
        if not parked:
            gate.set()

        def run() -> None:
            with self._lock:
                self.started.append(name)
            assert gate.wait(HANG_GUARD_S), f"{name} was parked too long"
            with self._lock:
                self.ran.append((name, threading.current_thread().name, torch.get_num_threads()))

        return run

    def where(self, name: str) -> tuple[str, int]:
        found = [(thread, threads) for job, thread, threads in self.ran if job == name]
        assert len(found) == 1, f"{name} ran {len(found)} times"
        return found[0]


def together(barrier: threading.Barrier, job: Callable[[], None]) -> Callable[[], None]:
    """``job``, once as many jobs as ``barrier`` has parties run at once."""

    def run() -> None:
        barrier.wait()
        job()

    return run


def two_worker_lane() -> ComputeLane:
    lane = ComputeLane("sie-t", workers=2, wide_threads=2, narrow_threads=1)
    lane.start()
    return lane


async def test_a_job_put_to_an_idle_lane_runs_alone_on_all_threads() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    try:
        lane.put(jobs.job("lone"), "lone")
        await lane.passed(HANG_GUARD_S)
        assert jobs.where("lone") == ("sie-t", 2)
    finally:
        await lane.stop(HANG_GUARD_S)


async def test_jobs_put_while_the_lane_is_busy_run_side_by_side_on_one_thread_each() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    both = threading.Barrier(2, timeout=HANG_GUARD_S)
    try:
        lane.put(jobs.job("first", parked=True), "first")
        await eventually(lambda: jobs.started == ["first"], "the first job starts")
        for name in ("left", "right"):
            lane.put(together(both, jobs.job(name)), name)
        await asyncio.sleep(0.05)
        assert jobs.started == ["first"], "a job started beside one that runs on all threads"
        jobs.gates["first"].set()
        await lane.passed(HANG_GUARD_S)  # the barrier only passes with both running at once
        assert jobs.where("first") == ("sie-t", 2)
        threads = {jobs.where("left"), jobs.where("right")}
        assert threads == {("sie-t", 1), ("sie-t-1", 1)}
    finally:
        await lane.stop(HANG_GUARD_S)


async def test_a_job_that_runs_alone_waits_for_the_others_and_nothing_overtakes_it() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    try:
        lane.put(jobs.job("first", parked=True), "first")
        await eventually(lambda: jobs.started == ["first"], "the first job starts")
        lane.put(jobs.job("narrow", parked=True), "narrow")
        lane.put(jobs.job("call"), "call", alone=True)
        lane.put(jobs.job("behind"), "behind")
        jobs.gates["first"].set()
        await eventually(lambda: "narrow" in jobs.started, "the narrow job starts")
        await asyncio.sleep(0.05)
        # A worker is free, but the call waits for the narrow job, and the job behind the call
        # waits for the call.
        assert jobs.started == ["first", "narrow"]
        jobs.gates["narrow"].set()
        await lane.passed(HANG_GUARD_S)
        assert jobs.started == ["first", "narrow", "call", "behind"]
        assert jobs.where("call") == ("sie-t", 2)
    finally:
        await lane.stop(HANG_GUARD_S)


async def test_a_pass_that_must_run_alone_by_the_time_it_starts_runs_alone() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    stateful = threading.Event()  # e.g. a LoRA adapter attached after the pass was put
    try:
        lane.put(jobs.job("first", parked=True), "first")
        await eventually(lambda: jobs.started == ["first"], "the first job starts")
        lane.put(jobs.job("pass", parked=True), "pass", alone=stateful.is_set)
        lane.put(jobs.job("next"), "next")
        stateful.set()
        jobs.gates["first"].set()
        await eventually(lambda: "pass" in jobs.started, "the pass starts")
        await asyncio.sleep(0.05)
        assert "next" not in jobs.started, "a job started beside a pass that must run alone"
        jobs.gates["pass"].set()
        await lane.passed(HANG_GUARD_S)
        assert jobs.where("pass") == ("sie-t", 2)
    finally:
        await lane.stop(HANG_GUARD_S)


async def test_busy_names_the_longest_running_job_and_stop_waits_for_every_worker() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    lane.put(jobs.job("first", parked=True), "first")
    await eventually(lambda: jobs.started == ["first"], "the first job starts")
    lane.put(jobs.job("a", parked=True), "a")
    lane.put(jobs.job("b", parked=True), "b")
    assert lane.busy is not None
    assert lane.busy[1] == "first"
    jobs.gates["first"].set()
    await eventually(lambda: len(jobs.started) == 3, "both narrow jobs start")
    busy = lane.busy
    assert busy is not None
    assert busy[1] in {"a", "b"}
    stopping = asyncio.ensure_future(lane.stop(HANG_GUARD_S))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    jobs.gates["a"].set()
    jobs.gates["b"].set()
    await asyncio.wait_for(stopping, HANG_GUARD_S)
    assert sorted(name for name, _, _ in jobs.ran) == ["a", "b", "first"]
    assert lane.busy is None


async def test_a_job_with_more_to_come_runs_narrow_on_an_idle_lane_and_the_next_beside_it() -> None:
    lane, jobs = two_worker_lane(), Recorder()
    both = threading.Barrier(2, timeout=HANG_GUARD_S)
    try:
        lane.put(together(both, jobs.job("first")), "first", last=False)
        lane.put(together(both, jobs.job("second")), "second")
        await lane.passed(HANG_GUARD_S)  # the barrier only passes with both running at once
        assert {jobs.where("first"), jobs.where("second")} == {("sie-t", 1), ("sie-t-1", 1)}
    finally:
        await lane.stop(HANG_GUARD_S)


@pytest.mark.parametrize("last", [True, False])
async def test_a_narrow_job_that_starts_with_nothing_beside_it_runs_on_all_threads(
    last: bool,
) -> None:
    """Put while the lane was busy, it was to run narrow; if by the time it starts nothing runs,
    nothing waits and nothing is to come (``last``), it gets every thread."""
    lane, jobs = two_worker_lane(), Recorder()
    try:
        lane.put(jobs.job("first", parked=True), "first")
        await eventually(lambda: jobs.started == ["first"], "the first job starts")
        lane.put(jobs.job("next"), "next", last=last)
        jobs.gates["first"].set()
        await eventually(lambda: len(jobs.ran) == 2, "the next job runs")
        if last:
            assert jobs.where("next") == ("sie-t", 2)
        else:
            assert jobs.where("next")[1] == 1
    finally:
        await lane.stop(HANG_GUARD_S)


def fresh_thread_width() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


async def test_a_narrow_job_leaves_the_threads_that_start_later_their_width() -> None:
    before = fresh_thread_width()
    lane, jobs = two_worker_lane(), Recorder()
    try:
        lane.put(jobs.job("first", parked=True), "first")
        await eventually(lambda: jobs.started == ["first"], "the first job starts")
        lane.put(jobs.job("narrow"), "narrow", last=False)
        jobs.gates["first"].set()
        await lane.passed(HANG_GUARD_S)
        assert jobs.where("narrow")[1] == 1
    finally:
        await lane.stop(HANG_GUARD_S)
    assert fresh_thread_width() == before  # torch.set_num_threads would have made it 1


def test_a_lane_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        ComputeLane("sie-t", workers=0)


# ---- configuration ------------------------------------------------------------------------------
def test_compute_workers_defaults_to_auto_and_is_validated() -> None:
    assert load_settings([], {}).compute_workers == 0
    assert load_settings(["--compute-workers", "1"], {}).compute_workers == 1
    assert load_settings([], {"SIE_COMPUTE_WORKERS": "2"}).compute_workers == 2
    with pytest.raises(SystemExit, match="--compute-workers must be 0"):
        load_settings(["--compute-workers", "-1"], {})


@pytest.mark.parametrize(("threads", "auto_workers"), [(1, 1), (2, 2), (4, 1), (16, 1)])
def test_auto_runs_two_passes_side_by_side_on_two_cores_only(
    monkeypatch: pytest.MonkeyPatch, threads: int, auto_workers: int
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cpu = Placement("cpu", "float32")
    assert compute_layout(cpu, 0) == (threads, auto_workers)
    assert compute_layout(cpu, 1) == (threads, 1)
    assert compute_layout(cpu, 2) == (threads, min(2, threads))  # never more than the threads
    assert compute_layout(Placement("cuda", "bfloat16"), 0) == (0, 1)


# ---- through the registry -----------------------------------------------------------------------
def overlapping(passes: list[ForwardPass]) -> bool:
    """Whether two of ``passes`` ran at the same time."""
    return any(
        a.started < b.ended and b.started < a.ended
        for i, a in enumerate(passes)
        for b in passes[i + 1 :]
    )


@pytest.mark.parametrize("concurrent", [True, False])
async def test_a_model_whose_passes_may_overlap_gets_two_batches_running(
    tmp_path: Path, concurrent: bool
) -> None:
    catalog = tmp_path / "catalog"
    options = {"concurrent": concurrent, "delay_s": 0.05}
    write_catalog_entry(catalog, fake_entry("fake/m", load_options=options))
    # Batches of two: the six calls of a round make three, one running and two waiting.
    settings = Settings(models_dir=(catalog,), device="cpu", compute_workers=2, max_batch_items=2)
    registry = build_registry(settings)

    async def client(number: int) -> None:  # closed loop: the next call once one returns
        for turn in range(4):
            call = EncodeCall([InputItem(text=f"c{number} t{turn}")], DOCS)
            await asyncio.wait_for(registry.encode("fake/m", call), HANG_GUARD_S)

    try:
        await asyncio.wait_for(registry.load("fake/m"), HANG_GUARD_S)
        adapter = registry.entry("fake/m").adapter
        assert isinstance(adapter, FakeAdapter)
        await asyncio.gather(*(client(number) for number in range(6)))
        passes = [p for p in adapter.passes if any(t.startswith("c") for t in p.texts)]
        assert sum(len(p.texts) for p in passes) == 24
        assert overlapping(passes) is concurrent
        threads = {p.thread for p in passes}
        assert threads == ({"sie-compute", "sie-compute-1"} if concurrent else {"sie-compute"})
    finally:
        await registry.close()


async def test_side_by_side_passes_of_a_real_model_give_its_vectors(tmp_path: Path) -> None:
    base = dense.build_tiny_dense(tmp_path / "dense")
    catalog = tmp_path / "catalog"
    write_catalog_entry(catalog, entry("tiny/dense", "dense", base, DENSE_OUTPUTS))
    registry = build_registry(Settings(models_dir=(catalog,), device="cpu", compute_workers=2))
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(24)]
    try:
        await asyncio.wait_for(registry.load("tiny/dense"), HANG_GUARD_S)
        adapter = registry.entry("tiny/dense").adapter
        assert adapter is not None
        assert adapter.concurrent_passes()
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(
                    registry.encode("tiny/dense", EncodeCall([InputItem(text=t)], DOCS))
                    for t in texts
                )
            ),
            HANG_GUARD_S,
        )
        got = np.array([o.result[0].dense for o in outcomes])
        assert cosines(got, dense.reference_st(base, texts)).min() >= 0.9999
    finally:
        await registry.close()


async def test_a_model_with_a_lora_adapter_attached_runs_its_passes_alone(tmp_path: Path) -> None:
    base = dense.build_tiny_dense(tmp_path / "dense")
    adapter_dir = str(build_lora(tmp_path / "lora", base, seed=5))
    catalog = tmp_path / "catalog"
    write_catalog_entry(
        catalog, entry("tiny/lora", "dense", base, DENSE_OUTPUTS, lora={"allowed": [adapter_dir]})
    )
    registry = build_registry(Settings(models_dir=(catalog,), device="cpu", compute_workers=2))
    try:
        await asyncio.wait_for(registry.load("tiny/lora"), HANG_GUARD_S)
        adapter = registry.entry("tiny/lora").adapter
        assert adapter is not None
        assert adapter.concurrent_passes()
        tuned = EncodeSettings(output_types=("dense",), options={"lora_id": adapter_dir})
        call = EncodeCall([InputItem(text="tuned")], tuned)
        while True:  # the first calls start the adapter's load and get LoraLoading
            try:
                await asyncio.wait_for(registry.encode("tiny/lora", call), HANG_GUARD_S)
                break
            except LoraLoading:
                await asyncio.sleep(0.01)
        assert not adapter.concurrent_passes()
    finally:
        await registry.close()


async def test_the_batches_of_a_lone_bulk_request_run_one_at_a_time_on_every_core(
    tmp_path: Path,
) -> None:
    """One request of four texts in batches of two: with no other request's work to run beside
    them, each batch runs on the first worker with all its threads, one after another (side by
    side, a core would idle behind the longer batch); two such requests at once overlap."""
    if torch.get_num_threads() < 2:
        pytest.skip("two compute workers need two torch threads")
    catalog = tmp_path / "catalog"
    options = {"concurrent": True, "delay_s": 0.05}
    write_catalog_entry(catalog, fake_entry("fake/m", load_options=options))
    settings = Settings(models_dir=(catalog,), device="cpu", compute_workers=2, max_batch_items=2)
    registry = build_registry(settings)

    def bulk(name: str) -> EncodeCall:
        return EncodeCall([InputItem(text=f"{name} {i}") for i in range(4)], DOCS)

    try:
        await asyncio.wait_for(registry.load("fake/m"), HANG_GUARD_S)
        adapter = registry.entry("fake/m").adapter
        assert isinstance(adapter, FakeAdapter)
        await asyncio.wait_for(registry.encode("fake/m", bulk("lone")), HANG_GUARD_S)
        lone = [p for p in adapter.passes if p.texts[0].startswith("lone")]
        assert sum(len(p.texts) for p in lone) == 4
        assert not overlapping(lone)
        assert {(p.thread, p.threads) for p in lone} == {("sie-compute", torch.get_num_threads())}
        calls = (registry.encode("fake/m", bulk(name)) for name in ("left", "right"))
        await asyncio.wait_for(asyncio.gather(*calls), HANG_GUARD_S)
        pair = [p for p in adapter.passes if p.texts[0].startswith(("left", "right"))]
        assert overlapping(pair)
    finally:
        await registry.close()


# ---- through gRPC -------------------------------------------------------------------------------
async def test_requests_over_grpc_run_side_by_side_and_their_timing_adds_up(tmp_path: Path) -> None:
    """Six closed-loop gRPC clients of a model whose passes may overlap: two passes run at once on
    the two workers, every reply carries its vector, and no reply's inference exceeds its total
    (passes side by side count once)."""
    model = "fake/side-by-side"
    options = {"load_options": {"concurrent": True, "delay_s": 0.05}}
    async with fake_model_server(
        tmp_path, model, options, compute_workers=2, max_batch_items=2
    ) as handle:
        stub = encode_pb2_grpc.EncodeServiceStub(handle.channel)
        replies: list[encode_pb2.EncodeResponse] = []

        async def client(number: int) -> None:
            for turn in range(4):
                request = encode_pb2.EncodeRequest(
                    model=model, items=[common_pb2.Item(text=f"c{number} t{turn}")]
                )
                replies.append(await stub.Encode(request, timeout=HANG_GUARD_S))

        await asyncio.gather(*(client(number) for number in range(6)))
        passes = [p for p in fake_adapter(handle, model).passes if p.texts[0].startswith("c")]
        assert sum(len(p.texts) for p in passes) == 24
        assert overlapping(passes)
        assert {p.thread for p in passes} == {"sie-compute", "sie-compute-1"}
        assert len(replies) == 24
        for reply in replies:
            assert len(reply.items) == 1
            assert reply.items[0].dense.dims == 2
            assert 0 < reply.timing.inference_ms <= reply.timing.total_ms
