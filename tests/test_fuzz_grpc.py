"""A gRPC fuzzer: random bytes and mutated valid requests (bit flips, truncations, spliced
fields) sent raw to every unary method. Every answer is OK or a client error with our ErrorInfo
(INVALID_ARGUMENT / NOT_FOUND), never INTERNAL or UNKNOWN, no call hangs, and the server keeps
serving. Seeded, so a failure replays."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import grpc
from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, extract_pb2, models_pb2, score_pb2

from tests.server_utils import HANG_GUARD_S, error_info, fake_entry, serving, write_catalog_entry

MODEL = "fake/fuzz"
CASES_PER_METHOD = 150
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
}


def seeds() -> dict[str, bytes]:
    """One valid request per method, serialized: the fuzzer's starting points."""
    item = common_pb2.Item(id="a", text="fuzz me please")
    query = common_pb2.Item(
        multivector=to_tensor(__import__("numpy").ones((2, 2), "float32"), common_pb2.DTYPE_FLOAT32)
    )
    encode = encode_pb2.EncodeRequest(model=MODEL, items=[item, item])
    encode.params.output_types.append("dense")
    encode.params.options.update({"profile": "default"})
    return {
        "/sie.v1.EncodeService/Encode": encode.SerializeToString(),
        "/sie.v1.ScoreService/Score": score_pb2.ScoreRequest(
            model=MODEL, query=query, items=[item]
        ).SerializeToString(),
        "/sie.v1.ExtractService/Extract": extract_pb2.ExtractRequest(
            model=MODEL, items=[item]
        ).SerializeToString(),
        "/sie.v1.ModelService/GetModel": models_pb2.GetModelRequest(name=MODEL).SerializeToString(),
    }


def mutations(seed: bytes, rng: random.Random) -> list[bytes]:
    def flip(data: bytes) -> bytes:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)

    def cut(data: bytes) -> bytes:
        return data[: rng.randrange(len(data))]

    def splice(data: bytes) -> bytes:
        at = rng.randrange(len(data))
        return data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]

    def noise(_: bytes) -> bytes:
        return rng.randbytes(rng.randint(0, 200))

    ops: list[Callable[[bytes], bytes]] = [flip, cut, splice, noise]
    return [rng.choice(ops)(seed) for _ in range(CASES_PER_METHOD)]


async def test_random_and_mutated_messages_get_client_errors_never_faults(
    tmp_path: Path,
) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    rng = random.Random(20261127)
    seen: dict[grpc.StatusCode, int] = {}
    async with serving([tmp_path / "catalog"], [MODEL]) as handle:
        for method, seed in seeds().items():
            call = handle.channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            for payload in mutations(seed, rng):
                try:
                    await asyncio.wait_for(call(payload, timeout=HANG_GUARD_S), HANG_GUARD_S)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    assert code in ACCEPTABLE, (method, payload, code, exc.details())  # noqa: PT017
                    reason = error_info(exc)[0]  # our ErrorInfo on every refusal
                    assert reason in ("INVALID_INPUT", "MODEL_NOT_FOUND"), (method, payload)
                seen[code] = seen.get(code, 0) + 1
        # Still serving: the seed request works.
        encode = handle.channel.unary_unary(
            "/sie.v1.EncodeService/Encode",
            request_serializer=lambda b: b,
            response_deserializer=encode_pb2.EncodeResponse.FromString,
        )
        reply = await encode(seeds()["/sie.v1.EncodeService/Encode"])
        assert len(reply.items) == 2
    assert sum(seen.values()) == CASES_PER_METHOD * len(seeds())
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
