"""GLiNER adapter against the gliner package itself (``GLiNER.predict_entities``, CPU, float32)
on tiny random checkpoints: a span-level model (as urchade/gliner_*-v2.1) and two token-level
ones. Requests go through ``resolve_extract`` -> ``extract_job`` -> ``run_inline``, the path the
engine takes.

The tiny models read at most 24 words per window (``max_len``) and spans of up to 12 words, so
a text of a few sentences spans several windows: windows of 24 words, consecutive ones sharing
12 (``min(2 * max_width, max_len // 2)``). The reference windows below are built from the
words splitter's offsets with that rule; each window's text is handed to ``predict_entities``.
A span's home window (the adapter's documented stitching rule) is the window holding it with
the most words between it and a cut window edge, the earliest on ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

import pytest
from sie_server.adapters.base import Extractor, ModelAdapter
from sie_server.adapters.gliner import GLiNERAdapter
from sie_server.adapters.hf import parameter_bytes
from sie_server.adapters.registry import create_adapter
from sie_server.catalog import BUILTIN_CATALOG_DIR, ModelSpec, load_catalog
from sie_server.catalog.spec import parse_spec
from sie_server.domain import ImageData, InputItem, Job
from sie_server.engine.warmup import run_inline, warm_up
from sie_server.errors import InputTooLong, InvalidInput
from sie_server.tasks.extract import (
    Entity,
    ExtractCall,
    ExtractedItem,
    ExtractParams,
    resolve_extract,
)

from tests.harness import load_adapter
from tests.tiny_models.gliner import (
    MAX_LEN,
    MAX_WIDTH,
    build_tiny_gliner,
    load_reference,
    reference_span_probs,
)

# transformers' DeBERTa-v2 module (imported by gliner) decorates with torch.jit.script.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

SHARED = 12  # words consecutive windows share: min(2 * MAX_WIDTH, MAX_LEN // 2)
TEXTS = [
    "Ada Lovelace wrote the first program in London.",
    "Barack Obama visited Paris and Berlin in 2015 with Angela Merkel.",
    "Zoë Ångström moved to Malmö — in 2019, she joined Spotify!",
]
LABEL_SETS = [
    ["person", "location", "date"],
    ["organization"],
    ["city", "country", "year", "name"],
]
LONG = (
    "In 1843 Ada Lovelace published notes on the Analytical Engine designed by Charles Babbage "
    "in London. Decades later Alan Turing worked at Bletchley Park near Milton Keynes, and after "
    "the war he moved to Manchester. Grace Hopper, an officer of the United States Navy, wrote "
    "one of the first compilers in Philadelphia in 1952. Today the Science Museum keeps a "
    "reconstruction of the Difference Engine for visitors from Paris, Tokyo and Berlin."
)
LONG_LABELS = ["person", "location", "organization", "date"]
# 36 words (two windows): with the tiny model, the best-scoring "person" span sits in the
# windows' overlap, and both windows score it above every other span's home-window score.
STRADDLE = (
    "professor station from 1843 Berlin wrote bridge London London bridge garden computer doctor "
    "Tokyo Grace Turing 1843 professor professor Monday station with with of painter Paris 1843 "
    "tower built bank a the Tokyo of London Lovelace"
)


# ---- fixtures and helpers --------------------------------------------------------------------
def gliner_spec(
    model_dir: Path,
    *,
    name: str = "tiny/gliner",
    max_sequence_length: int = 512,
    profiles: Mapping[str, Any] | None = None,
) -> ModelSpec:
    raw: dict[str, Any] = {
        "name": name,
        "adapter": "gliner",
        "weights_path": str(model_dir),
        "max_sequence_length": max_sequence_length,
        "outputs": {"json": {}},
    }
    if profiles:
        raw["profiles"] = dict(profiles)
    return parse_spec(raw)


def load_gliner(spec: ModelSpec) -> GLiNERAdapter:
    adapter = load_adapter(spec)
    assert isinstance(adapter, GLiNERAdapter)
    return adapter


@pytest.fixture(scope="module")
def span_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gliner(tmp_path_factory.mktemp("gliner-span"))


@pytest.fixture(scope="module")
def reference(span_dir: Path) -> Any:
    return load_reference(span_dir)


@pytest.fixture(scope="module")
def adapter(span_dir: Path) -> GLiNERAdapter:
    return load_gliner(gliner_spec(span_dir))


def make_call(
    adapter: ModelAdapter,
    texts: Sequence[str],
    labels: Sequence[str],
    **options: Any,
) -> ExtractCall:
    assert isinstance(adapter, Extractor)
    return resolve_extract(
        adapter.spec,
        [InputItem(text=t) for t in texts],
        ExtractParams(labels=labels, options=options),
        support=adapter.extract_support,
        accepted_options=adapter.extract_options,
        limits=64,
    )


def extract(
    adapter: ModelAdapter, texts: Sequence[str], labels: Sequence[str], **options: Any
) -> list[ExtractedItem]:
    assert isinstance(adapter, Extractor)
    results: list[ExtractedItem] = run_inline(
        adapter.extract_job(make_call(adapter, texts, labels, **options))
    )
    return results


def run_together(jobs: Sequence[Job[Any]]) -> tuple[list[Any], int]:
    """Run jobs the way the engine batches them: payloads of equal keys share one forward pass
    (collated and run with the first group's runner). Returns the results and the passes."""
    by_key: dict[Any, list[tuple[int, int]]] = {}
    for j, job in enumerate(jobs):
        for g, group in enumerate(job.groups):
            by_key.setdefault(group.key, []).append((j, g))
    outputs: list[list[list[Any]]] = [[[] for _ in job.groups] for job in jobs]
    for members in by_key.values():
        groups = [jobs[j].groups[g] for j, g in members]
        payloads = [p for group in groups for p in group.payloads]
        runner = groups[0].runner
        out = runner.run(runner.collate(payloads))
        pos = 0
        for (j, g), group in zip(members, groups, strict=True):
            outputs[j][g] = out[pos : pos + len(group.payloads)]
            pos += len(group.payloads)
    return [job.finish(out) for job, out in zip(jobs, outputs, strict=True)], len(by_key)


def assert_same_entities(
    got: Sequence[Entity], want: Sequence[Mapping[str, Any]], offset: int = 0
) -> None:
    """Same spans, texts and labels in the same order; scores within 1e-4."""
    assert [(e.start, e.end, e.text, e.label) for e in got] == [
        (w["start"] + offset, w["end"] + offset, w["text"], w["label"]) for w in want
    ]
    for e, w in zip(got, want, strict=True):
        assert isinstance(e.score, float)
        assert e.score == pytest.approx(w["score"], abs=1e-4)


def assert_same_results(got: Sequence[ExtractedItem], want: Sequence[ExtractedItem]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [(e.start, e.end, e.text, e.label) for e in g.entities] == [
            (e.start, e.end, e.text, e.label) for e in w.entities
        ]
        for ge, we in zip(g.entities, w.entities, strict=True):
            assert ge.score == pytest.approx(we.score, abs=1e-5)


def reference_windows(total: int) -> list[tuple[int, int]]:
    """Windows of MAX_LEN words, consecutive ones sharing SHARED words."""
    windows, start = [], 0
    while True:
        end = min(start + MAX_LEN, total)
        windows.append((start, end))
        if end == total:
            return windows
        start = end - SHARED


def home(windows: Sequence[tuple[int, int]], total: int, first: int, last: int) -> int:
    """The documented home window of words [first, last]: most words to a cut edge."""
    margins = [
        (
            min(
                first - s if s > 0 else total,
                e - 1 - last if e < total else total,
            ),
            -k,
        )
        for k, (s, e) in enumerate(windows)
        if s <= first and last < e
    ]
    return -max(margins)[1]


def window_text(
    text: str, words: Sequence[tuple[str, int, int]], window: tuple[int, int]
) -> tuple[int, str]:
    """The window's character offset in ``text`` and its text."""
    offset = words[window[0]][1]
    return offset, text[offset : words[window[1] - 1][2]]


def check_well_formed(text: str, entities: Sequence[Entity], *, flat: bool = True) -> None:
    for e in entities:
        assert e.start is not None
        assert e.end is not None
        assert text[e.start : e.end] == e.text
    keys = [(e.start, e.end, e.label) for e in entities]
    assert len(set(keys)) == len(keys), "an entity is reported twice"
    if flat:
        for x, y in combinations(entities, 2):
            assert (x.end or 0) <= (y.start or 0) or (y.end or 0) <= (x.start or 0), (x, y)


# ---- one window: the same as predict_entities -----------------------------------------------
@pytest.mark.parametrize(
    ("threshold", "flat_ner", "multi_label"),
    [(0.3, True, False), (0.2, False, False), (0.2, True, True), (0.25, False, True)],
)
@pytest.mark.parametrize("labels", LABEL_SETS)
def test_one_window_matches_predict_entities(
    adapter: GLiNERAdapter,
    reference: Any,
    labels: list[str],
    threshold: float,
    flat_ner: bool,
    multi_label: bool,
) -> None:
    results = extract(
        adapter, TEXTS, labels, threshold=threshold, flat_ner=flat_ner, multi_label=multi_label
    )
    found = 0
    for text, result in zip(TEXTS, results, strict=True):
        want = reference.predict_entities(
            text, labels, threshold=threshold, flat_ner=flat_ner, multi_label=multi_label
        )
        found += len(want)
        assert_same_entities(result.entities, want)
        assert result.relations == []
        assert result.classifications == []
        assert result.objects == []
    assert found, "the threshold should leave entities to compare"


def test_default_options_match_predict_entities(adapter: GLiNERAdapter, reference: Any) -> None:
    # GLiNER's defaults: threshold 0.5, flat_ner, no multi_label. The tiny model's scores stay
    # just below 0.5, so a default threshold under 0.45 would report entities here.
    for text, result in zip(TEXTS, extract(adapter, TEXTS, LABEL_SETS[0]), strict=True):
        assert_same_entities(result.entities, reference.predict_entities(text, LABEL_SETS[0]))
    assert any(r.entities for r in extract(adapter, TEXTS, LABEL_SETS[0], threshold=0.45))


def test_profile_options_set_the_defaults(span_dir: Path, adapter: GLiNERAdapter) -> None:
    spec = gliner_spec(
        span_dir,
        name="tiny/gliner-low",
        profiles={"default": {"output_types": ["json"], "options": {"threshold": 0.2}}},
    )
    low = load_gliner(spec)
    got = extract(low, TEXTS, LABEL_SETS[0])
    assert any(r.entities for r in got)
    assert_same_results(got, extract(adapter, TEXTS, LABEL_SETS[0], threshold=0.2))
    # A request's own option overrides the profile's.
    assert_same_results(
        extract(low, TEXTS, LABEL_SETS[0], threshold=0.5), extract(adapter, TEXTS, LABEL_SETS[0])
    )


# ---- several windows ---------------------------------------------------------------------------
def test_long_text_is_stitched_from_its_windows(adapter: GLiNERAdapter, reference: Any) -> None:
    threshold = 0.4
    words = list(reference.data_processor.words_splitter(LONG))
    windows = reference_windows(len(words))
    assert len(windows) >= 5
    job = adapter.extract_job(make_call(adapter, [LONG], LONG_LABELS, threshold=threshold))
    (group,) = job.groups
    assert [(p.start, p.end) for p in group.payloads] == windows
    (result,) = run_inline(job)
    entities = result.entities
    assert entities
    check_well_formed(LONG, entities)
    first_word = {start: i for i, (_, start, _) in enumerate(words)}
    last_word = {end: i for i, (_, _, end) in enumerate(words)}

    # Each entity is what predict_entities gives that span on its home window's text.
    in_overlap = 0
    for e in entities:
        a, b = first_word[e.start], last_word[e.end]
        containing = [k for k, (s, end) in enumerate(windows) if s <= a and b < end]
        in_overlap += len(containing) > 1
        offset, text = window_text(LONG, words, windows[home(windows, len(words), a, b)])
        span = [{"start": (e.start or 0) - offset, "end": (e.end or 0) - offset}]
        preds = reference.predict_entities(
            text, LONG_LABELS, threshold=0.0, flat_ner=False, multi_label=True, input_spans=[span]
        )
        (match,) = [p for p in preds if p["label"] == e.label]
        assert match["text"] == e.text
        assert e.score == pytest.approx(match["score"], abs=1e-4)
    assert in_overlap, "some entities should lie in two windows"

    # Nothing is lost: whatever a window reports for a span it is home to is in the result,
    # unless an overlapping reported entity scores at least as high (flat NER).
    reported = {(e.start, e.end, e.label): e for e in entities}
    span_windows: dict[tuple[int, int, str], int] = {}
    for k, window in enumerate(windows):
        offset, text = window_text(LONG, words, window)
        for p in reference.predict_entities(text, LONG_LABELS, threshold=threshold):
            key = (p["start"] + offset, p["end"] + offset, p["label"])
            span_windows[key] = span_windows.get(key, 0) + 1
            if home(windows, len(words), first_word[key[0]], last_word[key[1]]) != k:
                continue
            if key in reported:
                assert reported[key].score == pytest.approx(p["score"], abs=1e-4)
                continue
            assert any(
                (e.start or 0) < key[1] and key[0] < (e.end or 0) and e.score >= p["score"]
                for e in entities
            ), p
    seen_twice = sum(1 for key, n in span_windows.items() if n > 1 and key in reported)
    assert seen_twice, "some reported entity should be found by two windows"


def test_an_entity_in_a_window_overlap_is_reported_once(
    adapter: GLiNERAdapter, reference: Any
) -> None:
    labels = ["person"]
    words = list(reference.data_processor.words_splitter(STRADDLE))
    windows = reference_windows(len(words))
    assert windows == [(0, MAX_LEN), (MAX_LEN - SHARED, len(words))]
    probs = []
    for window in windows:
        _, text = window_text(STRADDLE, words, window)
        window_probs, window_words = reference_span_probs(reference, text, labels)
        assert window_words == [w for w, _, _ in words[window[0] : window[1]]]
        probs.append(window_probs)

    def score(k: int, a: int, b: int) -> float:
        return float(probs[k][a - windows[k][0], b - a, 0])

    # Every span's score in its home window, best first.
    spans = [(a, b) for a in range(len(words)) for b in range(a, min(a + MAX_WIDTH, len(words)))]
    ranked = sorted(
        ((score(home(windows, len(words), a, b), a, b), a, b) for a, b in spans), reverse=True
    )
    (top, a, b), runner_up = ranked[0], ranked[1][0]
    k = home(windows, len(words), a, b)
    other = score(1 - k, a, b)
    # The setting this test is about: the best span sits in the overlap, and the other window
    # scores it above every other span too, so both windows find it.
    assert windows[1][0] <= a
    assert b < windows[0][1]
    assert other > runner_up
    threshold = (runner_up + min(top, other)) / 2

    (result,) = extract(adapter, [STRADDLE], labels, threshold=threshold)
    start, end = words[a][1], words[b][2]
    assert [(e.start, e.end, e.text, e.label) for e in result.entities] == [
        (start, end, STRADDLE[start:end], "person")
    ]
    assert result.entities[0].score == pytest.approx(top, abs=1e-4)
    # Each window alone scores it above the threshold (with its own score): the duplicate
    # collapsed to the home window's.
    for j, window in enumerate(windows):
        offset, text = window_text(STRADDLE, words, window)
        span = [{"start": start - offset, "end": end - offset}]
        (match,) = reference.predict_entities(text, labels, threshold=threshold, input_spans=[span])
        assert (match["start"] + offset, match["end"] + offset) == (start, end)
        assert match["score"] == pytest.approx(score(j, a, b), abs=1e-4)


def test_windows_follow_the_token_limit(span_dir: Path, reference: Any) -> None:
    short = load_gliner(gliner_spec(span_dir, name="tiny/gliner-40", max_sequence_length=40))
    labels = ["person", "location"]
    monster = "-".join(["ab"] * 60)  # one word for the splitter, 119 WordPiece tokens
    texts = [LONG, f"Ada met {monster} in Paris."]
    job = short.extract_job(make_call(short, texts, labels, threshold=0.4))
    (group,) = job.groups
    payloads = list(group.payloads)
    # Costs are the real token counts of the collated rows (prompt and special tokens included).
    batch = short.collate_extract(payloads, job_settings(short, texts, labels))
    assert [p.cost for p in payloads] == batch["attention_mask"].sum(dim=1).tolist()
    assert all(p.cost <= 40 for p in payloads)
    assert list(group.costs) == [p.cost for p in payloads]
    assert job.tokens == sum(p.cost for p in payloads)
    long_windows = [(p.start, p.end) for p in payloads if p.item == 0]
    assert any(end - start < MAX_LEN for start, end in long_windows), "cut by tokens"
    assert long_windows[0][0] == 0
    assert long_windows[-1][1] == len(list(reference.data_processor.words_splitter(LONG)))
    for (s1, e1), (s2, e2) in pairwise(long_windows):
        assert s1 < s2 < e1 < e2  # overlapping, moving forward
    (lone,) = [p for p in payloads if p.item == 1 and monster in p.words]
    assert lone.words == [monster]
    assert lone.truncated
    assert [p.truncated for p in payloads if p is not lone] == [False] * (len(payloads) - 1)
    results = run_inline(job)
    for text, result in zip(texts, results, strict=True):
        check_well_formed(text, result.entities)
    assert results[0].entities


def job_settings(adapter: GLiNERAdapter, texts: Sequence[str], labels: Sequence[str]) -> Any:
    return make_call(adapter, texts, labels).settings


def test_costs_are_the_collated_token_counts(adapter: GLiNERAdapter) -> None:
    labels = LABEL_SETS[2]
    job = adapter.extract_job(make_call(adapter, [*TEXTS, LONG], labels))
    (group,) = job.groups
    batch = adapter.collate_extract(list(group.payloads), job_settings(adapter, TEXTS, labels))
    assert [p.cost for p in group.payloads] == batch["attention_mask"].sum(dim=1).tolist()


def test_labels_that_fill_the_token_limit(span_dir: Path) -> None:
    tight = load_gliner(gliner_spec(span_dir, name="tiny/gliner-8", max_sequence_length=8))
    with pytest.raises(InputTooLong, match="no room is left for text"):
        tight.extract_job(make_call(tight, TEXTS[:1], ["person", "location", "organization"]))


# ---- batching across requests -----------------------------------------------------------------
def test_requests_batched_together_give_their_own_results(adapter: GLiNERAdapter) -> None:
    people = ["person", "location"]
    calls = [
        make_call(adapter, TEXTS[:2], people, threshold=0.3),
        make_call(adapter, [TEXTS[2], LONG], people, threshold=0.2, flat_ner=False),
        make_call(
            adapter, [TEXTS[1], LONG], ["organization", "date"], threshold=0.35, multi_label=True
        ),
        make_call(adapter, TEXTS, people, threshold=0.25, merge_adjacent_entities=True),
    ]
    jobs = [adapter.extract_job(call) for call in calls]
    keys = [job.groups[0].key for job in jobs]
    # Options are decoded per request: only the labels split batches.
    assert keys[0] == keys[1] == keys[3] != keys[2]
    together, passes = run_together(jobs)
    assert passes == 2
    alone = [run_inline(adapter.extract_job(call)) for call in calls]
    for got, want in zip(together, alone, strict=True):
        assert_same_results(got, want)
    assert any(r.entities for results in together for r in results)
    # And the options did matter: the same texts under another request's options differ.
    other = extract(adapter, [TEXTS[2], LONG], people, threshold=0.3)
    assert [len(r.entities) for r in other] != [len(r.entities) for r in together[1]]


# ---- token-level models ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["bio", "represent_spans"])
def token_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GLiNERAdapter, Any]:
    represent = bool(request.param)
    folder = build_tiny_gliner(
        tmp_path_factory.mktemp("gliner-token"), span_mode="token_level", represent_spans=represent
    )
    adapter = load_gliner(gliner_spec(folder, name="tiny/gliner-token"))
    return adapter, load_reference(folder)


@pytest.mark.parametrize(("threshold", "flat_ner"), [(0.3, True), (0.45, True), (0.4, False)])
def test_token_level_model_matches_predict_entities(
    token_model: tuple[GLiNERAdapter, Any], threshold: float, flat_ner: bool
) -> None:
    adapter, reference = token_model
    labels = LABEL_SETS[0]
    results = extract(adapter, TEXTS, labels, threshold=threshold, flat_ner=flat_ner)
    found = 0
    for text, result in zip(TEXTS, results, strict=True):
        want = reference.predict_entities(text, labels, threshold=threshold, flat_ner=flat_ner)
        found += len(want)
        assert_same_entities(result.entities, want)
    assert found


def test_threshold_splits_batches_only_when_the_forward_pass_reads_it(
    token_model: tuple[GLiNERAdapter, Any],
) -> None:
    adapter, _ = token_model
    low, high = (
        adapter.extract_job(make_call(adapter, TEXTS, LABEL_SETS[0], threshold=t))
        for t in (0.3, 0.45)
    )
    reads_threshold = bool(adapter.model.config.represent_spans)
    assert (low.groups[0].key != high.groups[0].key) is reads_threshold
    together, passes = run_together([low, high])
    assert passes == (2 if reads_threshold else 1)
    assert_same_results(together[0], run_inline(low))
    assert_same_results(together[1], run_inline(high))


# ---- merging adjacent entities -----------------------------------------------------------------
def test_merge_adjacent_entities(adapter: GLiNERAdapter) -> None:
    labels = ["person", "location"]
    raw = extract(adapter, [*TEXTS, LONG], labels, threshold=0.3)
    merged = extract(adapter, [*TEXTS, LONG], labels, threshold=0.3, merge_adjacent_entities=True)
    merges = 0
    for text, r, m in zip([*TEXTS, LONG], raw, merged, strict=True):
        check_well_formed(text, m.entities)
        merges += len(r.entities) - len(m.entities)
        # Each merged entity is a run of raw entities of its label, each starting at most one
        # character after the previous one ends; it spans them and keeps the best score.
        covered = []
        for e in m.entities:
            inside = [
                x
                for x in r.entities
                if (e.start or 0) <= (x.start or 0)
                and (x.end or 0) <= (e.end or 0)
                and x.label == e.label
            ]
            assert inside
            assert min(x.start or 0 for x in inside) == e.start
            assert max(x.end or 0 for x in inside) == e.end
            assert e.score == max(x.score for x in inside)
            for x, y in pairwise(inside):
                assert (y.start or 0) <= (x.end or 0) + 1
            covered += inside
        assert sorted(covered, key=lambda x: (x.start, x.label)) == sorted(
            r.entities, key=lambda x: (x.start, x.label)
        )
        # Nothing mergeable is left.
        for x, y in pairwise(m.entities):
            assert not (x.label == y.label and (y.start or 0) <= (x.end or 0) + 1)
    assert merges, "some entities should have merged"


# ---- empty texts and errors ------------------------------------------------------------------
def test_empty_texts_give_empty_results(adapter: GLiNERAdapter, reference: Any) -> None:
    texts = ["", "   \n\t", TEXTS[0]]
    results = extract(adapter, texts, LABEL_SETS[0], threshold=0.3)
    assert results[0] == ExtractedItem()
    assert results[1] == ExtractedItem()
    assert_same_entities(
        results[2].entities, reference.predict_entities(TEXTS[0], LABEL_SETS[0], threshold=0.3)
    )
    job = adapter.extract_job(make_call(adapter, ["", " "], LABEL_SETS[0]))
    assert list(job.groups[0].payloads) == []
    assert run_inline(job) == [ExtractedItem(), ExtractedItem()]


def test_request_errors(adapter: GLiNERAdapter) -> None:
    def resolve(labels: Sequence[str], **params: Any) -> ExtractCall:
        return resolve_extract(
            adapter.spec,
            [InputItem(text=TEXTS[0])],
            ExtractParams(labels=labels, **params),
            support=adapter.extract_support,
            accepted_options=adapter.extract_options,
            limits=8,
        )

    with pytest.raises(InvalidInput, match="labels are required"):
        resolve([])
    with pytest.raises(InvalidInput, match="cannot fill an output_schema"):
        resolve(["person"], output_schema={"type": "object"})
    with pytest.raises(InvalidInput, match="unknown option 'treshold'"):
        resolve(["person"], options={"treshold": 0.3})
    bad = [
        ({"threshold": "high"}, "option 'threshold' must be a number"),
        ({"threshold": 1.5}, "option 'threshold' must be between 0 and 1"),
        ({"threshold": -0.1}, "option 'threshold' must be between 0 and 1"),
        ({"flat_ner": "yes"}, "option 'flat_ner' must be true or false"),
        ({"multi_label": 1}, "option 'multi_label' must be true or false"),
        (
            {"merge_adjacent_entities": None},
            "option 'merge_adjacent_entities' must be true or false",
        ),
    ]
    for options, message in bad:
        with pytest.raises(InvalidInput, match=message):
            adapter.extract_job(resolve(["person"], options=options))
    images = [InputItem(images=(ImageData(b"\x89PNG"),))]
    # Validation refuses images for a text-only model before any work ...
    with pytest.raises(InvalidInput, match="item 0: model tiny/gliner accepts text only"):
        resolve_extract(
            adapter.spec,
            images,
            ExtractParams(labels=["person"]),
            support=adapter.extract_support,
            accepted_options=adapter.extract_options,
            limits=8,
        )
    # ... and the family itself refuses a call that skipped it.
    call = dataclasses.replace(resolve(["person"]), items=images)
    with pytest.raises(InvalidInput, match="accepts text only"):
        adapter.extract_job(call)


# ---- lifecycle and catalog ---------------------------------------------------------------------
def test_warm_up_memory_and_unload(span_dir: Path, reference: Any) -> None:
    spec = gliner_spec(span_dir, name="tiny/gliner-life")
    local = load_gliner(spec)
    warm_up(local, spec)
    assert local.memory_bytes() == parameter_bytes(reference) > 0
    local.unload()
    assert local.memory_bytes() == 0


def test_catalog_entries() -> None:
    catalog = load_catalog([BUILTIN_CATALOG_DIR])
    for name in ("urchade/gliner_multi-v2.1", "urchade/gliner_small-v2.1"):
        spec = catalog[name]
        assert spec.adapter == "gliner"
        assert spec.hf_id == name
        assert spec.tasks == ("extract",)
        assert set(spec.outputs) == {"json"}
        assert spec.profile(None).output_types == ("json",)
        assert isinstance(create_adapter(spec), GLiNERAdapter)
