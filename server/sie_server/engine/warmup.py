"""Warm-up: one tiny request per task and output the model serves, run inline on the model
thread before the model is marked loaded, so that the first real request pays no lazy
initialisation (and a catalog profile the model cannot serve fails the load, not a request)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sie_server.adapters.base import Encoder, Extractor, ModelAdapter, Scorer
from sie_server.catalog import ModelSpec
from sie_server.domain import InputItem, Job
from sie_server.tasks.encode import EncodeParams, resolve_encode
from sie_server.tasks.extract import ExtractParams, resolve_extract
from sie_server.tasks.score import ScoreParams, resolve_score

TEXT = "Ada Lovelace wrote the first program in London."
QUERY = "Who wrote the first program?"


def warm_up(adapter: ModelAdapter, spec: ModelSpec) -> None:
    for make_job in warmup_jobs(adapter, spec):
        run_inline(make_job())


def warmup_jobs(adapter: ModelAdapter, spec: ModelSpec) -> Iterator[Callable[[], Job[Any]]]:
    """Encode (every output, as document and as query), score and extract, as the model serves."""
    items = [InputItem(text=TEXT)]
    if "encode" in spec.tasks and isinstance(adapter, Encoder):
        for is_query in (False, True):
            params = EncodeParams(output_types=spec.embedding_outputs, is_query=is_query)
            call = resolve_encode(
                spec, items, params, accepted_options=adapter.encode_options, max_items=1
            )
            yield lambda call=call: adapter.encode_job(call)  # type: ignore[misc]
    if "score" in spec.tasks and isinstance(adapter, Scorer):
        score_call = resolve_score(
            spec,
            InputItem(text=QUERY),
            items,
            ScoreParams(),
            accepted_options=adapter.score_option_keys(),
            max_items=1,
        )
        yield lambda: adapter.score_job(score_call)
    if "extract" in spec.tasks and isinstance(adapter, Extractor):
        support = adapter.extract_support
        labels = ("person", "location") if support.labels else ()
        extract_call = resolve_extract(
            spec,
            items,
            ExtractParams(labels=labels),
            support=support,
            accepted_options=adapter.extract_options,
            max_items=1,
        )
        yield lambda: adapter.extract_job(extract_call)


def run_inline(job: Job[Any]) -> Any:
    """Collate, run and finish a job on the calling thread (the model thread)."""
    outputs = [
        group.runner.run(group.runner.collate(list(group.payloads))) if group.payloads else []
        for group in job.groups
    ]
    return job.finish(outputs)
