"""MUVERA fixed-dimensional encodings (``tasks/muvera.py``) against fastembed's ``Muvera``, the
independent reference: equal for the same seed and parameters, queries and documents; the final
count sketch against a plain loop; seeds; empty-bucket filling; validation; and how the encode
task carries it (batch key, output types, dims, response size, postprocessing)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from fastembed.postprocess.muvera import Muvera
from sie_server.catalog.spec import parse_spec
from sie_server.domain import EncodeOutput, InputItem
from sie_server.errors import InvalidInput
from sie_server.tasks import muvera
from sie_server.tasks.encode import (
    EncodeCall,
    EncodeParams,
    check_response_size,
    convert_outputs,
    resolve_encode,
    response_bytes,
)
from sie_server.tasks.muvera import MuveraParams, encode_fde, parse_muvera
from sie_server.tasks.output_dtype import convert

TOKEN_DIMS = 16


def _spec(name: str, outputs: dict[str, Any], **fields: Any) -> Any:
    return parse_spec(
        {
            "name": name,
            "adapter": "x",
            "hf_id": "x/y",
            "max_sequence_length": 64,
            "outputs": outputs,
        }
        | fields
    )


COLBERT = _spec(
    "colbert",
    {"multivector": {"dims": TOKEN_DIMS, "similarity": "maxsim"}},
    profiles={
        "default": {"output_types": ["multivector"]},
        "muvera": {"output_types": ["multivector"], "options": {"muvera": {"r_reps": 4}}},
    },
)
M3 = _spec(
    "m3",
    {
        "dense": {"dims": 8},
        "sparse": {"dims": 100, "similarity": "dot"},
        "multivector": {"dims": TOKEN_DIMS, "similarity": "maxsim"},
    },
)
DENSE = _spec("dense-only", {"dense": {"dims": 8}})
ITEMS = [InputItem(text="a"), InputItem(text="b")]


# ---- the reference ---------------------------------------------------------------------------
def reference_fde(
    vectors: npt.NDArray[Any], params: MuveraParams, *, is_query: bool
) -> npt.NDArray[np.float32]:
    """fastembed's FDE (query or document), then the count sketch to ``final_dim`` written as a
    plain loop with the documented generator (``default_rng([seed, 1])``: slots, then signs)."""
    model = Muvera(
        dim=params.token_dims,
        k_sim=params.k_sim,
        dim_proj=params.dim_proj,
        r_reps=params.r_reps,
        random_seed=params.seed,
    )
    concat = model.process_query(vectors) if is_query else model.process_document(vectors)
    if params.final_dim is None:
        return np.asarray(concat, dtype=np.float32)
    rng = np.random.default_rng([params.seed, 1])
    slots = rng.integers(0, params.final_dim, size=concat.size)
    signs = rng.choice([-1, 1], size=concat.size)
    out = np.zeros(params.final_dim)
    for value, slot, sign in zip(concat, slots, signs, strict=True):
        out[slot] += sign * value
    return out.astype(np.float32)


def tokens(count: int, dims: int = TOKEN_DIMS, seed: int = 0) -> npt.NDArray[np.float32]:
    """ColBERT-like rows: random directions, L2-normalized, float32."""
    rows = np.random.default_rng(seed).normal(size=(count, dims))
    return np.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype=np.float32)


def assert_equal_to_reference(
    vectors: npt.NDArray[np.float32], params: MuveraParams, *, is_query: bool
) -> None:
    ours = encode_fde(vectors, params, is_query=is_query)
    want = reference_fde(vectors, params, is_query=is_query)
    assert ours.dtype == np.float32
    assert ours.shape == (params.dims,)
    gap = float(np.max(np.abs(ours - want)))
    assert np.allclose(ours, want, rtol=1e-6, atol=1e-6), f"max difference {gap}"


# ---- equality with fastembed -----------------------------------------------------------------
#: (token dims, option, tokens): projections and none, final dims and none, one token, many
#: empty buckets (k_sim 8 with 5 tokens), long documents.
CASES: list[tuple[int, dict[str, Any], int]] = [
    (16, {"k_sim": 3, "dim_proj": 8, "r_reps": 5, "final_dim": None, "seed": 7}, 10),
    (16, {"k_sim": 4, "r_reps": 3, "final_dim": None, "seed": 0}, 3),
    (128, {"k_sim": 5, "dim_proj": 16, "r_reps": 20, "final_dim": None, "seed": 42}, 180),
    (32, {"k_sim": 6, "r_reps": 10, "final_dim": 512, "seed": 123}, 40),
    (24, {"k_sim": 2, "dim_proj": 5, "r_reps": 4, "final_dim": 17, "seed": 2**40}, 1),
    (16, {"k_sim": 8, "dim_proj": 4, "r_reps": 2, "final_dim": None, "seed": 99}, 5),
    (16, {}, 32),
]


@pytest.mark.parametrize("is_query", [True, False], ids=["query", "document"])
@pytest.mark.parametrize(("dims", "option", "count"), CASES)
def test_equals_fastembed(dims: int, option: dict[str, Any], count: int, is_query: bool) -> None:
    params = parse_muvera(option, dims, "m")
    assert_equal_to_reference(tokens(count, dims, seed=count), params, is_query=is_query)


@pytest.mark.parametrize("is_query", [True, False], ids=["query", "document"])
def test_equals_fastembed_when_the_bucket_sums_take_several_passes(
    monkeypatch: pytest.MonkeyPatch, is_query: bool
) -> None:
    monkeypatch.setattr(muvera, "_CELLS_PER_PASS", 3 * 40 * TOKEN_DIMS)
    params = parse_muvera({"k_sim": 3, "r_reps": 7, "dim_proj": 8, "final_dim": None}, 16, "m")
    assert_equal_to_reference(tokens(40), params, is_query=is_query)


def test_raw_float32_vectors_not_normalized_also_match() -> None:
    vectors = np.random.default_rng(5).normal(scale=3.0, size=(25, 16)).astype(np.float32)
    params = parse_muvera({"k_sim": 4, "dim_proj": 8, "r_reps": 6, "seed": 5}, 16, "m")
    for is_query in (True, False):
        assert_equal_to_reference(vectors, params, is_query=is_query)


# ---- seeds -------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_encoding_and_another_seed_another() -> None:
    vectors = tokens(12)
    params = parse_muvera({"k_sim": 4, "dim_proj": 8, "r_reps": 8, "seed": 3}, 16, "m")
    first = encode_fde(vectors, params, is_query=False)
    muvera._randomness.cache_clear()  # drawn again from the seed, not reused
    again = encode_fde(vectors, params, is_query=False)
    assert first.tobytes() == again.tobytes()
    other = encode_fde(vectors, replace(params, seed=4), is_query=False)
    assert not np.allclose(first, other)


def test_queries_and_documents_differ() -> None:
    vectors = tokens(12)
    params = parse_muvera({"k_sim": 3, "r_reps": 4, "final_dim": None}, 16, "m")
    query = encode_fde(vectors, params, is_query=True)
    document = encode_fde(vectors, params, is_query=False)
    assert not np.allclose(query, document)


# ---- bucket semantics, from the paper, without the reference --------------------------------
def _hyperplanes(params: MuveraParams) -> list[npt.NDArray[np.float64]]:
    rng = np.random.default_rng(params.seed)
    return [rng.normal(size=(params.token_dims, params.k_sim)) for _ in range(params.r_reps)]


def _bucket(vector: npt.NDArray[np.float32], planes: npt.NDArray[np.float64]) -> int:
    return sum(1 << i for i in range(planes.shape[1]) if float(vector @ planes[:, i]) > 0)


def test_a_one_token_document_fills_every_bucket_with_it_and_a_query_fills_one() -> None:
    params = parse_muvera({"k_sim": 3, "r_reps": 5, "final_dim": None}, 16, "m")
    vector = tokens(1)
    document = encode_fde(vector, params, is_query=False).reshape(5, 8, 16)
    np.testing.assert_array_equal(document, np.broadcast_to(vector[0], (5, 8, 16)))
    query = encode_fde(vector, params, is_query=True).reshape(5, 8, 16)
    for rep, planes in enumerate(_hyperplanes(params)):
        own = _bucket(vector[0], planes)
        np.testing.assert_array_equal(query[rep, own], vector[0])
        assert not np.any(np.delete(query[rep], own, axis=0))


def test_document_buckets_average_and_empty_ones_take_the_nearest_buckets_first_token() -> None:
    params = parse_muvera({"k_sim": 4, "r_reps": 6, "final_dim": None, "seed": 11}, 16, "m")
    vectors = tokens(5, seed=1)
    fde = encode_fde(vectors, params, is_query=False).reshape(6, 16, 16)
    filled = 0
    for rep, planes in enumerate(_hyperplanes(params)):
        ids = [_bucket(v, planes) for v in vectors]
        for bucket in range(16):
            members = [t for t, b in enumerate(ids) if b == bucket]
            if members:
                want = vectors[members].astype(np.float64).mean(axis=0)
            else:
                filled += 1
                distance = {b: bin(b ^ bucket).count("1") for b in sorted(set(ids))}
                nearest = min(distance, key=lambda b: (distance[b], b))
                want = vectors[ids.index(nearest)]
            np.testing.assert_allclose(fde[rep, bucket], want, rtol=1e-6, atol=1e-7)
    assert filled > 0


def test_no_tokens_give_a_zero_vector() -> None:
    params = parse_muvera({"k_sim": 2, "r_reps": 2}, 16, "m")
    for is_query in (True, False):
        fde = encode_fde(np.zeros((0, 16), dtype=np.float32), params, is_query=is_query)
        assert fde.shape == (params.dims,)
        assert not fde.any()


# ---- parameters --------------------------------------------------------------------------------
def test_defaults_are_the_original_sies() -> None:
    params = parse_muvera({}, 128, "m")
    assert (params.k_sim, params.dim_proj, params.r_reps, params.seed) == (6, 128, 40, 42)
    assert params.concat_dims == 40 * 64 * 128
    assert params.final_dim == params.dims == 10240


def test_final_dim_defaults_only_when_the_concatenation_is_longer() -> None:
    short = parse_muvera({"k_sim": 3, "r_reps": 2}, 16, "m")
    assert short.final_dim is None
    assert short.dims == 2 * 8 * 16
    assert parse_muvera({"final_dim": None}, 128, "m").dims == 40 * 64 * 128
    assert parse_muvera({"final_dim": 100.0, "seed": 7.0}, 16, "m").dims == 100


@pytest.mark.parametrize(
    ("option", "dims", "fragment"),
    [
        ({"ksim": 3}, 16, "option 'muvera' has unknown key 'ksim' (keys: k_sim, dim_proj"),
        ({"k_sim": 0}, 16, "'muvera.k_sim' must be between 1 and 8, got 0"),
        ({"k_sim": 9}, 16, "'muvera.k_sim' must be between 1 and 8, got 9"),
        ({"k_sim": 2.5}, 16, "'muvera.k_sim' must be an integer, got float 2.5"),
        ({"k_sim": True}, 16, "'muvera.k_sim' must be an integer, got bool True"),
        ({"r_reps": "4"}, 16, "'muvera.r_reps' must be an integer, got str '4'"),
        ({"r_reps": 0}, 16, "'muvera.r_reps' must be between 1 and 128, got 0"),
        ({"dim_proj": 17}, 16, "'muvera.dim_proj' must be between 1 and 16 (the model's"),
        ({"seed": -1}, 16, "'muvera.seed' must be between 0 and 9007199254740991, got -1"),
        ({"seed": 2**53}, 16, "'muvera.seed' must be between 0 and 9007199254740991"),
        (
            {"k_sim": 2, "r_reps": 1, "final_dim": 65},
            16,
            "'muvera.final_dim' must be between 1 and 64",
        ),
        ({"final_dim": 0}, 16, "'muvera.final_dim' must be between 1 and"),
        ({"k_sim": 8, "r_reps": 128}, 256, "r_reps * 2**k_sim * dim_proj = 8388608 exceeds the"),
        ({"k_sim": 1, "dim_proj": 1000}, 1024, "projection values exceed the limit"),
    ],
)
def test_bad_parameters_are_invalid_input(option: dict[str, Any], dims: int, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_muvera(option, dims, "m")
    assert fragment in caught.value.message
    assert caught.value.model == "m"


# ---- the encode task ---------------------------------------------------------------------------
def encode(spec: Any, **params: Any) -> EncodeCall:
    return resolve_encode(spec, ITEMS, EncodeParams(**params), accepted_options=(), limits=4)


def with_muvera(option: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {"muvera": dict(option), **extra}


def test_muvera_runs_the_multivector_forward_pass_and_keeps_the_batch_key() -> None:
    plain = encode(COLBERT, output_types=["multivector"])
    fde = encode(COLBERT, output_types=["dense"], options=with_muvera({"k_sim": 2, "r_reps": 3}))
    other = encode(COLBERT, options=with_muvera({"k_sim": 5, "seed": 1}))
    assert fde.settings.output_types == ("multivector",)
    assert fde.settings.batch_key() == plain.settings.batch_key() == other.settings.batch_key()
    assert fde.output_types == other.output_types == ("dense",)
    assert fde.muvera is not None
    assert fde.muvera.params.dims == 3 * 4 * TOKEN_DIMS
    assert fde.dense_dims == 3 * 4 * TOKEN_DIMS
    query = encode(COLBERT, is_query=True, options=with_muvera({}))
    assert query.muvera is not None
    assert query.muvera.is_query
    assert query.settings.batch_key() != plain.settings.batch_key()


def test_asking_for_the_multivector_too_returns_both() -> None:
    call = encode(COLBERT, output_types=["multivector", "dense"], options=with_muvera({}))
    assert call.output_types == ("dense", "multivector")
    assert call.muvera is not None
    assert call.muvera.keep_multivector


def test_on_bge_m3_the_fde_replaces_the_cls_vector() -> None:
    call = encode(M3, output_types=["sparse", "dense"], options=with_muvera({"r_reps": 2}))
    assert call.settings.output_types == ("sparse", "multivector")
    assert call.output_types == ("dense", "sparse")
    assert call.dense_dims == 2 * 64 * TOKEN_DIMS


def test_the_profile_gives_the_fde_alone_and_null_turns_it_off() -> None:
    call = encode(COLBERT, options={"profile": "muvera"})
    assert call.output_types == ("dense",)
    assert call.muvera is not None
    assert call.muvera.params.r_reps == 4
    off = encode(COLBERT, options={"profile": "muvera", "muvera": None})
    assert off.muvera is None
    assert off.output_types == ("multivector",)


@pytest.mark.parametrize(
    ("spec", "params", "fragment"),
    [
        (
            DENSE,
            {"options": with_muvera({})},
            "option 'muvera' encodes multivectors; model dense-only has none (it produces dense)",
        ),
        (COLBERT, {"options": {"muvera": 3}}, "option 'muvera' must be a mapping, got int 3"),
        (COLBERT, {"options": with_muvera({"k_sim": 0})}, "'muvera.k_sim' must be between"),
        (
            COLBERT,
            {"dimensions": 8, "options": with_muvera({})},
            "dimensions does not apply to a MUVERA encoding",
        ),
        (
            COLBERT,
            {"output_types": ["sparse"], "options": with_muvera({})},
            "does not produce sparse",
        ),
        (COLBERT, {"output_types": ["dense"]}, "does not produce dense"),
    ],
)
def test_invalid_requests(spec: Any, params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        encode(spec, **params)
    assert fragment in caught.value.message


def test_response_size_counts_the_fde_not_the_tokens() -> None:
    small = encode(COLBERT, options=with_muvera({"final_dim": 1000}))
    large = encode(COLBERT, options=with_muvera({"final_dim": 2000}))
    size = response_bytes(small, COLBERT, 1)
    assert response_bytes(small, COLBERT, 10_000) == size
    assert response_bytes(large, COLBERT, 1) - size == len(ITEMS) * 1000 * 4
    check_response_size(small, COLBERT, 10_000, limit=size)
    with pytest.raises(InvalidInput, match="over the message limit"):
        check_response_size(large, COLBERT, 1, limit=size)
    both = encode(
        COLBERT, output_types=["dense", "multivector"], options=with_muvera({"final_dim": 1000})
    )
    assert response_bytes(both, COLBERT, 100) - size == 100 * TOKEN_DIMS * 4


@pytest.mark.parametrize("dtype", ["float32", "int8", "binary"])
def test_postprocessing_converts_the_fde_to_the_output_dtype(dtype: str) -> None:
    call = encode(
        COLBERT, is_query=True, output_dtype=dtype, options=with_muvera({"k_sim": 3, "r_reps": 5})
    )
    assert call.muvera is not None
    vectors = [tokens(7, seed=1), tokens(3, seed=2)]
    outputs = [EncodeOutput(multivector=v) for v in vectors]
    results = convert_outputs(
        outputs,
        [(7, False), (3, True)],
        call.settings.output_types,
        call.output_dtype,
        dimensions=call.dimensions,
        muvera=call.muvera,
    )
    for result, v in zip(results, vectors, strict=True):
        assert result.multivector is None
        assert result.dense is not None
        want = convert(reference_fde(v, call.muvera.params, is_query=True), dtype)
        np.testing.assert_array_equal(result.dense, want)
    assert [(r.num_tokens, r.truncated) for r in results] == [(7, False), (3, True)]


@pytest.mark.parametrize("name", ["colbert-ir/colbertv2.0", "BAAI/bge-m3"])
def test_builtin_muvera_profiles_pass_the_startup_check_and_give_10240_dims(name: str) -> None:
    from sie_server.adapters.registry import adapter_class
    from sie_server.catalog import BUILTIN_CATALOG_DIR, load_catalog
    from sie_server.engine.warmup import check_profiles

    spec = load_catalog([BUILTIN_CATALOG_DIR])[name]
    check_profiles(spec, adapter_class(spec.adapter))
    for is_query in (False, True):
        call = encode(spec, is_query=is_query, options={"profile": "muvera"})
        assert call.output_types == ("dense",)
        assert call.settings.output_types == ("multivector",)
        assert call.dense_dims == 10240
        assert call.muvera is not None
        assert call.muvera.is_query is is_query
