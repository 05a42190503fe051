"""MUVERA fixed-dimensional encodings (FDE): one dense vector from a multivector, whose dot
product approximates MaxSim (Dhulipala et al. 2024, "MUVERA: Multi-Vector Retrieval via Fixed
Dimensional Encodings").

For each of ``r_reps`` repetitions, ``k_sim`` random hyperplanes (SimHash) split the token space
into ``2**k_sim`` buckets; a token's bucket is the bit pattern of the hyperplanes it lies on the
positive side of (bit ``i`` for hyperplane ``i``). Each bucket gets one vector:

* a query sums its tokens in the bucket (empty buckets stay zero);
* a document averages them, and an empty bucket takes the first token of the nearest non-empty
  bucket by Hamming distance between bucket ids (ties: the smallest id), the paper's
  ``fill_empty_partitions``.

The bucket vectors go through a random ±1 projection to ``dim_proj`` dims, scaled by
``1/sqrt(dim_proj)`` (none when ``dim_proj`` is the token dims), and are concatenated over the
repetitions: ``r_reps * 2**k_sim * dim_proj`` values. ``final_dim`` optionally count-sketches that
down: each coordinate is added, with a random sign, into a random one of ``final_dim`` slots.

Randomness follows fastembed's ``Muvera`` exactly (so the same seed gives the same FDE there):
one ``numpy.random.default_rng(seed)`` draws the hyperplanes of every repetition in turn
(``normal``, shape ``(token_dims, k_sim)`` each), then the projections
(``choice([-1, 1], size=(r_reps, token_dims, dim_proj))``). The final count sketch, which
fastembed does not have, draws from its own ``default_rng([seed, 1])``: the slot of every
coordinate (``integers(0, final_dim)``), then its sign (``choice([-1, 1])``). Computation is in
float64, as fastembed's, and the result float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sie_server.errors import InvalidInput

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: The keys of the ``muvera`` option.
MUVERA_KEYS = ("k_sim", "dim_proj", "r_reps", "final_dim", "seed")
#: Defaults, as the original SIE's: 64 buckets, 40 repetitions, no inner projection (the token
#: dims), the concatenation count-sketched down to 10240 dims when it is longer, seed 42.
DEFAULT_K_SIM = 6
DEFAULT_R_REPS = 40
DEFAULT_FINAL_DIM = 10240
DEFAULT_SEED = 42
MAX_K_SIM = 8
MAX_R_REPS = 128
#: Values of the concatenation before ``final_dim`` (16 MiB of float32).
MAX_CONCAT_DIMS = 1 << 22
#: Random ±1 values of the inner projections (``r_reps * token_dims * dim_proj``).
MAX_PROJECTION_VALUES = 1 << 23
#: Seeds travel as JSON / Struct numbers (doubles): beyond 2**53 they are no longer exact.
MAX_SEED = 2**53 - 1
#: The count sketch's generator is ``default_rng([seed, FINAL_STREAM])``.
FINAL_STREAM = 1
#: (token, dim) cells one pass of the bucket sums handles.
_CELLS_PER_PASS = 1 << 21


@dataclass(frozen=True, slots=True)
class MuveraParams:
    """A validated FDE configuration for multivectors of ``token_dims`` dims."""

    token_dims: int
    k_sim: int
    dim_proj: int
    r_reps: int
    final_dim: int | None
    seed: int

    @property
    def buckets(self) -> int:
        return 1 << self.k_sim

    @property
    def concat_dims(self) -> int:
        """Dims of the concatenation over repetitions, before ``final_dim``."""
        return self.r_reps * self.buckets * self.dim_proj

    @property
    def dims(self) -> int:
        """Dims of the FDE."""
        return self.final_dim or self.concat_dims


# ---- validation --------------------------------------------------------------------------------
def parse_muvera(value: Mapping[str, Any], token_dims: int, model: str) -> MuveraParams:
    """The ``muvera`` option (a mapping; ``{}`` takes every default) for a model whose
    multivectors have ``token_dims`` dims, or InvalidInput naming the bad key."""
    unknown = sorted(str(k) for k in value if k not in MUVERA_KEYS)
    if unknown:
        raise InvalidInput(
            f"option 'muvera' has unknown key {unknown[0]!r} (keys: {', '.join(MUVERA_KEYS)})",
            model=model,
        )

    def read(key: str, default: int, hi: int, lo: int = 1, why: str = "") -> int:
        raw = value.get(key)
        return default if raw is None else _integer(raw, key, lo, hi, model, why)

    k_sim = read("k_sim", DEFAULT_K_SIM, MAX_K_SIM)
    dim_proj = read("dim_proj", token_dims, token_dims, why=" (the model's multivector dims)")
    r_reps = read("r_reps", DEFAULT_R_REPS, MAX_R_REPS)
    seed = read("seed", DEFAULT_SEED, MAX_SEED, lo=0)
    params = MuveraParams(token_dims, k_sim, dim_proj, r_reps, None, seed)
    _check_sizes(params, model)
    concat = params.concat_dims
    if "final_dim" not in value:
        final_dim = DEFAULT_FINAL_DIM if concat > DEFAULT_FINAL_DIM else None
    elif value["final_dim"] is None:
        final_dim = None
    else:
        why = " (r_reps * 2**k_sim * dim_proj)"
        final_dim = _integer(value["final_dim"], "final_dim", 1, concat, model, why)
    return MuveraParams(token_dims, k_sim, dim_proj, r_reps, final_dim, seed)


def _integer(raw: Any, key: str, lo: int, hi: int, model: str, why: str = "") -> int:
    """An integer in [lo, hi]; a Struct carries numbers as doubles, so 6.0 is 6."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        shown = f"{type(raw).__name__} {raw!r}"
        raise InvalidInput(f"option 'muvera.{key}' must be an integer, got {shown}", model=model)
    if not lo <= raw <= hi:
        raise InvalidInput(
            f"option 'muvera.{key}' must be between {lo} and {hi}{why}, got {raw}", model=model
        )
    return raw


def _check_sizes(params: MuveraParams, model: str) -> None:
    """Bound the concatenation and the random projections one configuration holds."""
    if params.concat_dims > MAX_CONCAT_DIMS:
        raise InvalidInput(
            f"option 'muvera': r_reps * 2**k_sim * dim_proj = {params.concat_dims} exceeds the "
            f"limit of {MAX_CONCAT_DIMS}; lower r_reps, k_sim or dim_proj",
            model=model,
        )
    values = params.r_reps * params.token_dims * params.dim_proj
    if params.dim_proj < params.token_dims and values > MAX_PROJECTION_VALUES:
        raise InvalidInput(
            f"option 'muvera': r_reps * token dims * dim_proj = {values} projection values "
            f"exceed the limit of {MAX_PROJECTION_VALUES}; lower r_reps or dim_proj",
            model=model,
        )


# ---- randomness --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Randomness:
    """Everything a configuration draws, once."""

    #: ``[token_dims, r_reps * k_sim]``: column ``r * k_sim + i`` is hyperplane i of repetition r.
    hyperplanes: F64
    #: ``[r_reps, token_dims, dim_proj]`` of ±1, or None without inner projection.
    projections: npt.NDArray[np.int8] | None
    #: The final count sketch, or None without ``final_dim``.
    sketch: _CountSketch | None


@dataclass(frozen=True, slots=True)
class _CountSketch:
    """A slot in ``[0, dims)`` and a ±1 sign for every coordinate of the concatenation."""

    dims: int
    slots: npt.NDArray[np.int32]
    signs: npt.NDArray[np.int8]

    def apply(self, concat: F64) -> F64:
        """Each coordinate added, with its sign, into its slot (in coordinate order)."""
        return _bincount(self.slots, self.signs * concat, self.dims)


@functools.lru_cache(maxsize=8)
def _randomness(params: MuveraParams) -> _Randomness:
    rng = np.random.default_rng(params.seed)
    shape = (params.r_reps, params.token_dims, params.k_sim)
    planes = rng.normal(size=shape).transpose(1, 0, 2).reshape(params.token_dims, -1)
    projections = None
    if params.dim_proj < params.token_dims:
        size = (params.r_reps, params.token_dims, params.dim_proj)
        projections = rng.choice([-1, 1], size=size).astype(np.int8)
    sketch = None
    if params.final_dim is not None:
        final = np.random.default_rng([params.seed, FINAL_STREAM])
        slots = final.integers(0, params.final_dim, size=params.concat_dims).astype(np.int32)
        signs = final.choice([-1, 1], size=params.concat_dims).astype(np.int8)
        sketch = _CountSketch(params.final_dim, slots, signs)
    return _Randomness(np.ascontiguousarray(planes), projections, sketch)


@functools.lru_cache(maxsize=MAX_K_SIM)
def _hamming(k_sim: int) -> npt.NDArray[np.uint8]:
    """``[2**k_sim, 2**k_sim]``: the Hamming distance between every two bucket ids."""
    ids = np.arange(1 << k_sim)
    xor = ids[:, None] ^ ids[None, :]
    bits = (xor[..., None] >> np.arange(k_sim)) & 1
    distances: npt.NDArray[np.uint8] = bits.sum(axis=-1).astype(np.uint8)
    return distances


# ---- encoding ----------------------------------------------------------------------------------
def encode_fde(multivector: npt.NDArray[Any], params: MuveraParams, *, is_query: bool) -> F32:
    """The FDE of one multivector (``[tokens, token_dims]``): the query variant (sums) or the
    document variant (averages, empty buckets filled). No tokens give a zero vector."""
    x = np.asarray(multivector, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != params.token_dims:
        raise ValueError(f"expected a [tokens, {params.token_dims}] multivector, got {x.shape}")
    if x.shape[0] == 0:
        return np.zeros(params.dims, dtype=np.float32)
    chance = _randomness(params)
    slots = _bucket_slots(x, chance.hyperplanes, params)
    buckets = _bucket_sums(x, slots, params)
    if not is_query:
        _average_and_fill(buckets, x, slots, params)
    concat = _project(buckets, chance.projections, params).reshape(-1)
    if chance.sketch is not None:
        concat = chance.sketch.apply(concat)
    return concat.astype(np.float32)


def _bucket_slots(x: F64, hyperplanes: F64, params: MuveraParams) -> npt.NDArray[np.int64]:
    """``[tokens, r_reps]``: each token's bucket in each repetition, as a row of the
    ``[r_reps * buckets]`` table of bucket vectors (``rep * buckets + id``)."""
    above = (x @ hyperplanes > 0).reshape(x.shape[0], params.r_reps, params.k_sim)
    ids = above @ np.left_shift(1, np.arange(params.k_sim, dtype=np.int64))
    slots: npt.NDArray[np.int64] = ids + np.arange(params.r_reps) * params.buckets
    return slots


def _bucket_sums(x: F64, slots: npt.NDArray[np.int64], params: MuveraParams) -> F64:
    """``[r_reps * buckets, token_dims]``: the sum of each bucket's tokens. A ``bincount`` over
    (slot, dim) cells in token order adds each bucket's tokens in token order, as a loop over the
    tokens would; repetitions go in passes of at most ``_CELLS_PER_PASS`` cells (one at least),
    which bounds the memory a long multivector takes."""
    tokens, dims = x.shape
    sums = np.empty((params.r_reps * params.buckets, dims))
    step = max(1, _CELLS_PER_PASS // (tokens * dims))
    for first in range(0, params.r_reps, step):
        reps = min(step, params.r_reps - first)
        local = slots[:, first : first + reps] - first * params.buckets
        cells = (local[:, :, None] * dims + np.arange(dims)).reshape(-1)
        values = np.broadcast_to(x[:, None, :], (tokens, reps, dims)).reshape(-1)
        rows = slice(first * params.buckets, (first + reps) * params.buckets)
        sums[rows] = _bincount(cells, values, reps * params.buckets * dims).reshape(-1, dims)
    return sums


def _average_and_fill(
    buckets: F64, x: F64, slots: npt.NDArray[np.int64], params: MuveraParams
) -> None:
    """Documents (in place): sums become averages, and each empty bucket takes the first token
    of its nearest non-empty bucket (Hamming distance of the ids, smallest id on ties)."""
    total = params.r_reps * params.buckets
    counts = np.bincount(slots.reshape(-1), minlength=total)
    occupied = counts > 0
    np.divide(buckets, counts[:, None], out=buckets, where=occupied[:, None])
    empty = np.flatnonzero(~occupied)
    if empty.size == 0:
        return
    rep, bucket = np.divmod(empty, params.buckets)
    # The first token of each occupied slot: its first occurrence in token order.
    seen, where = np.unique(slots.reshape(-1), return_index=True)
    first = np.zeros(total, dtype=np.int64)
    first[seen] = where // params.r_reps
    same_rep = occupied.reshape(params.r_reps, params.buckets)[rep]
    distances = np.where(same_rep, _hamming(params.k_sim)[bucket], np.uint8(params.k_sim + 1))
    nearest = rep * params.buckets + distances.argmin(axis=1)
    buckets[empty] = x[first[nearest]]


def _project(buckets: F64, projections: npt.NDArray[np.int8] | None, params: MuveraParams) -> F64:
    """``[r_reps, buckets, dim_proj]``: each repetition's ±1 projection, scaled by
    ``1/sqrt(dim_proj)``; the bucket vectors themselves without projection."""
    table = buckets.reshape(params.r_reps, params.buckets, params.token_dims)
    if projections is None:
        return table
    projected: F64 = (1 / math.sqrt(params.dim_proj)) * (table @ projections.astype(np.float64))
    return projected


def _bincount(index: npt.NDArray[np.integer[Any]], weights: F64, length: int) -> F64:
    """``out[index[i]] += weights[i]`` for every i in order, into ``length`` zeros."""
    return np.asarray(np.bincount(index, weights=weights, minlength=length), dtype=np.float64)
