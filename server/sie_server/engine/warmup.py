"""Sample calls per task, resolved through the same code as requests, for two uses:

* **Catalog check** (startup): every profile of every model resolves for every task the model
  serves, so a profile with an option key its family does not read, or a template with a foreign
  placeholder, stops the server with a CatalogError naming the file and profile, instead of
  failing requests later.
* **Warm-up** (load): one tiny request per task and output the model serves (and one image for
  a model that takes images), run inline on the model thread before the model is marked loaded,
  so the first real request pays no lazy initialisation; option values only the family checks (a GLiNER threshold, a score mode) fail
  the load there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sie_server.adapters.base import Encoder, Extractor, ModelAdapter, Scorer
from sie_server.catalog import CatalogError, ModelSpec
from sie_server.domain import ImageData, InputItem, Job
from sie_server.errors import InvalidInput
from sie_server.tasks.encode import ENCODE_KEYS, EncodeCall, EncodeParams, resolve_encode
from sie_server.tasks.extract import EXTRACT_KEYS, ExtractCall, ExtractParams, resolve_extract
from sie_server.tasks.score import (
    SCORE_KEYS,
    ScoreCall,
    ScoreParams,
    resolve_score,
    resolve_score_mode,
)

TEXT = "Ada Lovelace wrote the first program in London."
QUERY = "Who wrote the first program?"
Call = EncodeCall | ScoreCall | ExtractCall


def sample_calls(
    spec: ModelSpec, cls: type[ModelAdapter], profile: str | None = None
) -> Iterator[Call]:
    """Encode (every output, as document and as query), score and extract, as the model serves
    them, under ``profile`` (the default one when None). Raises InvalidInput like a request."""
    options = {} if profile is None else {"profile": profile}
    items = [InputItem(text=TEXT)]
    if "encode" in spec.tasks and issubclass(cls, Encoder):
        for is_query in (False, True):
            params = EncodeParams(
                output_types=spec.embedding_outputs, is_query=is_query, options=options
            )
            yield resolve_encode(spec, items, params, accepted_options=cls.encode_options, limits=1)
        if "image" in spec.inputs:
            params = EncodeParams(output_types=spec.embedding_outputs, options=options)
            yield resolve_encode(
                spec, [sample_image()], params, accepted_options=cls.encode_options, limits=1
            )
    if "score" in spec.tasks and issubclass(cls, Scorer):
        call = resolve_score(
            spec,
            InputItem(text=QUERY),
            items,
            ScoreParams(options=options),
            accepted_options=cls.score_option_keys(),
            limits=1,
        )
        if issubclass(cls, Encoder):
            resolve_score_mode(spec, call.settings.options)
        yield call
    if "extract" in spec.tasks and issubclass(cls, Extractor):
        support = cls.extract_support
        yield resolve_extract(
            spec,
            items,
            ExtractParams(labels=("person", "location") if support.labels else (), options=options),
            support=support,
            accepted_options=cls.extract_options,
            limits=1,
        )


def sample_image() -> InputItem:
    """An item with one grey 64x64 image, already decoded (what the image pool hands a family),
    so that warm-up runs the vision tower too."""
    from PIL import Image

    picture = Image.new("RGB", (64, 64), (128, 128, 128))
    return InputItem(images=(ImageData(b"", "png", decoded=picture),))


def option_keys(spec: ModelSpec, cls: type[ModelAdapter]) -> frozenset[str]:
    """Every option key some task of the model reads (what a profile may set)."""
    keys: set[str] = set()
    if "encode" in spec.tasks and issubclass(cls, Encoder):
        keys |= ENCODE_KEYS | cls.encode_options
    if "score" in spec.tasks and issubclass(cls, Scorer):
        keys |= SCORE_KEYS | cls.score_option_keys()
    if "extract" in spec.tasks and issubclass(cls, Extractor):
        keys |= EXTRACT_KEYS | cls.extract_options
    return frozenset(keys)


def check_profiles(spec: ModelSpec, cls: type[ModelAdapter]) -> None:
    """Every profile sets only options some task of the model reads, and resolves for every
    task the model serves (else CatalogError naming the file and the profile)."""
    where = spec.source_file or spec.name
    known = option_keys(spec, cls)
    for profile in spec.profiles.values():
        unknown = sorted(k for k in profile.options if k not in known)
        if unknown:
            raise CatalogError(
                f"{where}: profile {profile.name!r}: option {unknown[0]!r} is read by no task "
                f"of {spec.name} (known: {', '.join(sorted(known))})"
            )
    for name in spec.profiles:
        try:
            for _ in sample_calls(spec, cls, name):
                pass
        except InvalidInput as exc:
            raise CatalogError(f"{where}: profile {name!r}: {exc.message}") from None


def warm_up(adapter: ModelAdapter, spec: ModelSpec) -> None:
    for call in sample_calls(spec, type(adapter)):
        run_inline(job_for(adapter, call))


def job_for(adapter: ModelAdapter, call: Call) -> Job[Any]:
    """The job a capability makes of a call (tokenizer pool work, done inline here)."""
    if isinstance(call, EncodeCall):
        assert isinstance(adapter, Encoder)
        return adapter.encode_job(call)
    if isinstance(call, ScoreCall):
        assert isinstance(adapter, Scorer)
        return adapter.score_job(call)
    assert isinstance(adapter, Extractor)
    return adapter.extract_job(call)


def run_inline(job: Job[Any]) -> Any:
    """Collate, run and finish a job on the calling thread (the model thread)."""
    outputs = [
        group.runner.run(group.runner.collate(list(group.payloads))) if group.payloads else []
        for group in job.groups
    ]
    return job.finish(outputs)
