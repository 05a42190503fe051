"""The engine's part of image inputs, with a fake two-tower adapter: requests with images are
decoded and prepared in the image pool (never the event loop, the tokenizer pool or the model
thread), a family sees decoded RGB images, text and image payloads of one request run in
separate forward passes (one per modality) and come back in item order, and the limits are
enforced over gRPC before any model work."""

from __future__ import annotations

import io
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc
from sie_server.domain import EncodeOutput, InputItem, TokenizedText
from sie_server.tasks.encode import EncodeSettings

from tests.fakes import FakeAdapter, expected_vector
from tests.server_utils import ServerHandle, error_info, fake_entry, serving, write_catalog_entry

MODEL = "fake/two-towers"


class TwoTowerFake(FakeAdapter):
    """Text items as the fake encodes them; an image item's vector is [-width, -height], and
    its cost is one token per 8x8 patch. Records the thread of every prepare and the modality
    of every forward pass."""

    prepare_threads: ClassVar[list[str]] = []
    pass_modalities: ClassVar[list[set[str]]] = []

    def prepare_encode(
        self, items: Sequence[InputItem], settings: EncodeSettings
    ) -> list[TokenizedText]:
        TwoTowerFake.prepare_threads.append(threading.current_thread().name)
        out = []
        for item in items:
            if item.images:
                picture = item.images[0].decoded
                assert picture is not None, "the engine decodes images before prepare"
                assert picture.mode == "RGB"
                width, height = picture.size
                patches = max(1, (width // 8) * (height // 8))
                out.append(TokenizedText([0] * patches, extra=("image", width, height)))
            else:
                out += self.tokenize([item.text or ""])
        return out

    def modality(self, payload: TokenizedText) -> str:
        return "image" if isinstance(payload.extra, tuple) else "text"

    def collate_encode(self, payloads: Sequence[TokenizedText], settings: EncodeSettings) -> Any:
        return list(payloads)

    def run_encode(self, inputs: Any, settings: EncodeSettings) -> list[EncodeOutput]:
        TwoTowerFake.pass_modalities.append({self.modality(p) for p in inputs})
        out = []
        for payload in inputs:
            if isinstance(payload.extra, tuple):
                _, width, height = payload.extra
                out.append(EncodeOutput(dense=np.array([-width, -height], dtype=np.float32)))
            else:
                ids = payload.input_ids
                out.append(EncodeOutput(dense=np.array([len(ids), sum(ids)], dtype=np.float32)))
        return out


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def image_item(width: int, height: int) -> common_pb2.Item:
    return common_pb2.Item(images=[common_pb2.ImageInput(data=png(width, height), format="png")])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerHandle]:
    folder = tmp_path_factory.mktemp("catalog")
    entry = fake_entry(MODEL, adapter=f"{__name__}:TwoTowerFake", inputs=["text", "image"])
    write_catalog_entry(folder, entry)
    write_catalog_entry(folder, fake_entry("fake/text-only"))
    async with serving(
        [folder],
        preload=[MODEL],
        max_images_per_item=1,
        max_image_bytes=4000,
        max_image_pixels=10_000,
    ) as handle:
        yield handle


def vectors(reply: encode_pb2.EncodeResponse) -> list[list[float]]:
    return [from_tensor(item.dense.values).tolist() for item in reply.items]


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_warm_up_ran_the_image_tower_at_load(server: ServerHandle) -> None:
    # The module's first test: only the preload's warm-up has run passes so far.
    assert {"image"} in TwoTowerFake.pass_modalities
    assert {"text"} in TwoTowerFake.pass_modalities


async def test_image_requests_prepare_in_the_image_pool_and_text_ones_do_not(
    server: ServerHandle,
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    TwoTowerFake.prepare_threads.clear()
    # Two texts: one alone would be prepared on the event loop (test_inline_prepare.py).
    texts = [common_pb2.Item(text="a b"), common_pb2.Item(text="c d")]
    await stub.Encode(encode_pb2.EncodeRequest(model=MODEL, items=texts))
    await stub.Encode(encode_pb2.EncodeRequest(model=MODEL, items=[image_item(16, 8)]))
    text_thread, image_thread = TwoTowerFake.prepare_threads
    assert text_thread.startswith("sie-tokenize")
    assert image_thread.startswith("sie-image")


async def test_a_mixed_request_runs_one_pass_per_modality_and_keeps_item_order(
    server: ServerHandle,
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    TwoTowerFake.pass_modalities.clear()
    # Texts of one length: texts of 3 and 4 tokens would pad 1 of 8 tokens, over the padding
    # cap (10%), and run in two passes for that reason alone.
    items = [
        common_pb2.Item(text="one two"),
        image_item(32, 8),
        common_pb2.Item(text="three four"),
        image_item(8, 32),
    ]
    reply = await stub.Encode(encode_pb2.EncodeRequest(model=MODEL, items=items))
    got = vectors(reply)
    assert got[1] == [-32.0, -8.0]
    assert got[3] == [-8.0, -32.0]
    assert got[0] == expected_vector("one two").tolist()
    assert got[2] == expected_vector("three four").tolist()
    assert sorted(map(sorted, TwoTowerFake.pass_modalities)) == [["image"], ["text"]]
    assert [item.num_tokens for item in reply.items][1::2] == [4, 4], "an image costs its patches"


async def test_score_with_an_image_query_against_text_items(server: ServerHandle) -> None:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    reply = await stub.Score(
        score_pb2.ScoreRequest(
            model=MODEL,
            query=image_item(16, 16),
            items=[common_pb2.Item(text="x"), common_pb2.Item(text="x y z")],
        )
    )
    assert len(reply.scores) == 2


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            common_pb2.Item(images=[common_pb2.ImageInput(data=png(8, 8))] * 2),
            "--max-images-per-item",
        ),
        (common_pb2.Item(images=[common_pb2.ImageInput(data=b"\0" * 4001)]), "--max-image-bytes"),
        (image_item(200, 100), "--max-image-pixels"),
        (common_pb2.Item(images=[common_pb2.ImageInput(data=b"GIF89a....")]), "item 1: image 0"),
    ],
    ids=["count", "bytes", "pixels", "corrupt"],
)
async def test_limits_and_bad_images_are_invalid_argument_and_serving_goes_on(
    server: ServerHandle, item: common_pb2.Item, expected: str
) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    request = encode_pb2.EncodeRequest(model=MODEL, items=[common_pb2.Item(text="fine"), item])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in str(caught.value.details())
    assert error_info(caught.value)[0] == "INVALID_INPUT"
    reply = await stub.Encode(encode_pb2.EncodeRequest(model=MODEL, items=[image_item(8, 8)]))
    assert vectors(reply) == [[-8.0, -8.0]]


async def test_a_text_only_model_refuses_images(server: ServerHandle) -> None:
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    request = encode_pb2.EncodeRequest(model="fake/text-only", items=[image_item(8, 8)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "accepts text only" in str(caught.value.details())
