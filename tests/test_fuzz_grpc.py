"""A gRPC fuzzer: random bytes and mutated valid requests (bit flips, truncations, spliced
fields) sent raw to every unary method, and streams of valid and mutated messages to the
bidirectional EncodeStream. Every answer is OK or a client error with our ErrorInfo
(INVALID_ARGUMENT / NOT_FOUND), never INTERNAL or UNKNOWN, no call hangs, and the server keeps
serving. Seeded, so a failure replays."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from sie_sdk.tensors import to_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, extract_pb2, models_pb2, score_pb2

from tests import fuzz_profile
from tests.server_utils import HANG_GUARD_S, error_info, fake_entry, serving, write_catalog_entry

MODEL = "fake/fuzz"
ENCODE = "/sie.v1.EncodeService/Encode"
CASES_PER_METHOD = fuzz_profile.budget(150)
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
    return [mutate(seed, rng) for _ in range(CASES_PER_METHOD)]


def mutate(seed: bytes, rng: random.Random) -> bytes:
    """``seed`` with one mutation: bit flips, a truncation, a splice of random bytes, or noise."""

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
    return rng.choice(ops)(seed)


async def test_random_and_mutated_messages_get_client_errors_never_faults(
    tmp_path: Path,
) -> None:
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    rng = random.Random(fuzz_profile.seed(20261127))
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


STREAMS = fuzz_profile.budget(60)


async def test_streams_of_mutated_messages_end_in_answers_or_a_client_error(
    tmp_path: Path,
) -> None:
    """``EncodeStream`` (bidirectional) fed streams of 1-5 messages, each the seed or a mutation
    of it: the stream ends OK or with INVALID_ARGUMENT and our ``ErrorInfo``, never INTERNAL or
    UNKNOWN; each answer is a result or a per-sequence error; a stream of unmutated messages is
    answered in full, however many mutated streams ran before it."""
    write_catalog_entry(tmp_path / "catalog", fake_entry(MODEL))
    rng = random.Random(fuzz_profile.seed(20261129))
    seed = encode_pb2.EncodeStreamRequest(
        sequence=1, request=encode_pb2.EncodeRequest.FromString(seeds()[ENCODE])
    ).SerializeToString()
    ended: dict[grpc.StatusCode, int] = {}
    async with serving([tmp_path / "catalog"], [MODEL]) as handle:
        stream = handle.channel.stream_stream(
            "/sie.v1.EncodeService/EncodeStream",
            request_serializer=lambda b: b,
            response_deserializer=encode_pb2.EncodeStreamResponse.FromString,
        )

        async def run(messages: list[bytes]) -> tuple[grpc.StatusCode, list[Any]]:
            call = stream(iter(messages), timeout=HANG_GUARD_S)
            answers = [answer async for answer in call]
            return await call.code(), answers

        for _ in range(STREAMS):
            messages = [
                seed if rng.random() < 0.5 else mutate(seed, rng) for _ in range(rng.randint(1, 5))
            ]
            failure: grpc.aio.AioRpcError | None = None
            try:
                code, answers = await asyncio.wait_for(run(messages), HANG_GUARD_S)
            except grpc.aio.AioRpcError as exc:
                failure, code, answers = exc, exc.code(), []
            if failure is not None:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (messages, failure.details())
                assert error_info(failure)[0] == "INVALID_INPUT", messages
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
            ended[code] = ended.get(code, 0) + 1
            assert len(answers) <= len(messages)
            for answer in answers:
                assert answer.WhichOneof("result") in ("response", "error"), answer
                if answer.WhichOneof("result") == "error":
                    assert answer.error.reason in ("INVALID_INPUT", "MODEL_NOT_FOUND"), answer
        # Still serving streams: unmutated messages are all answered.
        code, answers = await run([seed, seed, seed])
        assert code == grpc.StatusCode.OK
        assert [answer.WhichOneof("result") for answer in answers] == ["response"] * 3
    assert sum(ended.values()) == STREAMS
    assert ended.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0, ended
