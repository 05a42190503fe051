"""Images end to end: tiny CLIP, SigLIP and SigLIP 2 dual encoders served through the catalog, over
gRPC, the HTTP bridge (msgpack bin and JSON base64 images) and the SDK (both clients, both
transports, PIL / numpy / path / PNG and JPEG bytes), each vector checked against transformers
computing it in-process on the same bytes decoded by PIL. Also: the SDK reference's image examples
run as written, mixed text and image requests, scoring in both directions, every kind of bad image
refused naming the item while the server keeps serving, concurrent image requests sharing
forward passes, and a text-only model refusing images."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from sie_sdk import SIEAsyncClient, SIEClient
from sie_sdk.inputs import prepare_item
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc, score_pb2, score_pb2_grpc

from tests.bridge_utils import JSON_HEADERS, BridgeHandle, bridged, pack, unpack
from tests.sdk.conftest import CASES, Case, call, make_sdk
from tests.server_utils import ServerHandle, fake_entry, serving, write_catalog_entry
from tests.tiny_models import clip
from tests.tiny_models.entries import entry

#: The tiny CLIP is served under the name the SDK reference's examples use.
CLIP = "openai/clip-vit-base-patch32"
SIGLIP = "tiny/siglip"
SIGLIP2 = "tiny/siglip2"
TEXT_ONLY = "tiny/text-only"
MODELS = (CLIP, SIGLIP, SIGLIP2)
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "x"]
#: Small limits, so that refusing a large image needs no large request.
MAX_IMAGE_BYTES = 64_000
MAX_IMAGE_PIXELS = 250_000


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images-e2e")
    return {
        CLIP: clip.build_tiny_clip(root / "clip"),
        SIGLIP: clip.build_tiny_siglip(root / "siglip"),
        SIGLIP2: clip.build_tiny_siglip2(root / "siglip2"),
    }


@pytest.fixture(scope="module")
def catalog_dir(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    catalog = tmp_path_factory.mktemp("images-catalog")
    dims = {CLIP: clip.CLIP_DIMS, SIGLIP: clip.SIGLIP_DIMS, SIGLIP2: clip.SIGLIP_DIMS}
    lengths = {
        CLIP: clip.CLIP_TEXT_POSITIONS,
        SIGLIP: clip.SIGLIP_TEXT_POSITIONS,
        SIGLIP2: clip.SIGLIP_TEXT_POSITIONS,
    }
    for name, folder in folders.items():
        outputs = {"dense": {"dims": dims[name], "similarity": "cosine"}}
        write_catalog_entry(
            catalog,
            entry(name, "clip", folder, outputs, lengths[name], inputs=["text", "image"]),
        )
    write_catalog_entry(catalog, fake_entry(TEXT_ONLY))
    return catalog


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving(
        [catalog_dir],
        preload=[*MODELS, TEXT_ONLY],
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
    ) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


@pytest.fixture
def stub(server: ServerHandle) -> encode_pb2_grpc.EncodeServiceStub:
    return encode_pb2_grpc.EncodeServiceStub(server.channel)


# ---- inputs and references -------------------------------------------------------------------
def pictures(count: int = 3) -> list[Image.Image]:
    sizes = [(40, 50), (64, 48), (20, 20), (33, 90)]
    return [clip.random_image(*sizes[seed % len(sizes)], seed) for seed in range(count)]


def png(image: Image.Image) -> bytes:
    return clip.image_bytes(image, "PNG")


def jpeg(image: Image.Image) -> bytes:
    return clip.image_bytes(image, "JPEG")


def want_images(folder: Path, data: Sequence[bytes]) -> np.ndarray:
    """The reference vectors of encoded images, decoded as the server decodes them."""
    return clip.reference_images(folder, [clip.decoded(d) for d in data])


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cosine = clip.cosines(got, want)
    assert (cosine >= 0.9999).all(), cosine


def image_proto(data: bytes, fmt: str = "") -> common_pb2.Item:
    return common_pb2.Item(images=[common_pb2.ImageInput(data=data, format=fmt)])


def dense_of(response: encode_pb2.EncodeResponse) -> np.ndarray:
    return np.stack([from_tensor(item.dense.values) for item in response.items])


# ---- gRPC ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
async def test_grpc_mixed_texts_and_images_equal_transformers(
    stub: Any, model: str, folders: dict[str, Path]
) -> None:
    images = pictures(2)
    data = [png(images[0]), jpeg(images[1])]
    items = [
        common_pb2.Item(id="t0", text=TEXTS[0]),
        common_pb2.Item(id="i0", images=[common_pb2.ImageInput(data=data[0], format="png")]),
        common_pb2.Item(id="t1", text=TEXTS[1]),
        common_pb2.Item(id="i1", images=[common_pb2.ImageInput(data=data[1])]),  # no hint
    ]
    response = await stub.Encode(encode_pb2.EncodeRequest(model=model, items=items))
    assert [item.id for item in response.items] == ["t0", "i0", "t1", "i1"]
    got = dense_of(response)
    assert_close(got[[0, 2]], clip.reference_texts(folders[model], TEXTS[:2]))
    assert_close(got[[1, 3]], want_images(folders[model], data))


async def test_grpc_image_tokens_are_the_vision_towers(stub: Any) -> None:
    want = {CLIP: clip.CLIP_IMAGE_TOKENS, SIGLIP: clip.SIGLIP_IMAGE_TOKENS}
    for model, tokens in want.items():
        response = await stub.Encode(
            encode_pb2.EncodeRequest(model=model, items=[image_proto(png(pictures(1)[0]))])
        )
        assert response.items[0].num_tokens == tokens


# ---- the bridge: msgpack bin and JSON base64 ----------------------------------------------------
@pytest.mark.parametrize("model", [CLIP, SIGLIP])
async def test_bridge_msgpack_and_json_images_equal_transformers(
    http: BridgeHandle, model: str, folders: dict[str, Path]
) -> None:
    images = pictures(2)
    data = [png(images[0]), jpeg(images[1])]
    want = np.concatenate(
        [want_images(folders[model], data), clip.reference_texts(folders[model], TEXTS[:1])]
    )

    def body(spell: Any) -> dict[str, Any]:
        return {
            "items": [
                {"id": "png", "images": [{"data": spell(data[0]), "format": "png"}]},
                {"id": "jpeg", "images": [{"data": spell(data[1]), "format": "jpeg"}]},
                {"id": "text", "text": TEXTS[0]},
            ]
        }

    headers = {"Content-Type": "application/msgpack"}
    async with http.session.post(
        f"/v1/encode/{model}", data=pack(body(bytes)), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        packed = unpack(await response.read())
    encoded = body(lambda raw: base64.b64encode(raw).decode())
    async with http.session.post(
        f"/v1/encode/{model}", json=encoded, headers=JSON_HEADERS
    ) as response:
        assert response.status == 200, await response.text()
        as_json = await response.json()
    for result in (packed, as_json):
        assert [item["id"] for item in result["items"]] == ["png", "jpeg", "text"]
        got = np.stack(
            [np.asarray(item["dense"]["values"], np.float32) for item in result["items"]]
        )
        assert_close(got, want)


# ---- the SDK --------------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session", params=CASES, ids=[c.id for c in CASES])
async def client(
    request: pytest.FixtureRequest, server: ServerHandle, http: BridgeHandle
) -> AsyncIterator[SIEClient | SIEAsyncClient]:
    case: Case = request.param
    sdk = make_sdk(case, case.url(grpc_address=server.address, http_url=http.url))
    try:
        yield sdk.client
    finally:
        await sdk.close()


def sent_bytes(item: dict[str, Any]) -> list[bytes]:
    """The image bytes the SDK sends for ``item`` (PIL, arrays and paths become JPEG)."""
    return [bytes(image["data"]) for image in prepare_item(item)["images"]]


@pytest.mark.parametrize("model", [CLIP, SIGLIP])
async def test_sdk_image_inputs_equal_transformers(
    client: SIEClient | SIEAsyncClient, model: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    images = pictures(4)
    path = tmp_path / "photo.png"
    images[2].save(path)
    items: list[dict[str, Any]] = [
        {"id": "pil", "images": [images[0]]},
        {"id": "numpy", "images": [{"data": np.array(images[1])}]},
        {"id": "path", "images": [str(path)]},
        {"id": "pathlib", "images": [{"data": path}]},
        {"id": "png", "images": [{"data": png(images[3])}]},
        {"id": "jpeg", "images": [{"data": jpeg(images[3]), "format": "jpeg"}]},
        {"id": "text", "text": TEXTS[1]},
    ]
    results = await call(client, "encode", model, items)
    assert [r["id"] for r in results] == [item["id"] for item in items]
    data = [sent_bytes(item)[0] for item in items[:-1]]
    want = np.concatenate(
        [want_images(folders[model], data), clip.reference_texts(folders[model], TEXTS[1:2])]
    )
    assert_close(np.stack([r["dense"] for r in results]), want)


def run_reference_examples(url: str) -> dict[str, Any]:
    """The SDK reference's "Image Handling" examples and its multimodal ``Item`` pattern, as
    written (in the folder holding photo.jpg and photo2.jpg); each result by example."""
    from sie_sdk.types import Item

    client = SIEClient(url)
    results: dict[str, Any] = {}
    image_bytes = Path("photo.jpg").read_bytes()

    # From PIL Image (recommended)
    pil_image = Image.open("photo.jpg")
    result = client.encode("openai/clip-vit-base-patch32", Item(
        images=[{"data": pil_image}]
    ))  # fmt: skip
    results["pil"] = result

    # From file path (string or Path)
    result = client.encode("openai/clip-vit-base-patch32", Item(
        images=[{"data": "photo.jpg"}]
    ))  # fmt: skip
    results["path"] = result

    # From bytes (passed through as-is)
    result = client.encode("openai/clip-vit-base-patch32", Item(
        images=[{"data": image_bytes, "format": "jpeg"}]
    ))  # fmt: skip
    results["bytes"] = result

    # From numpy array (H, W, C)
    result = client.encode("openai/clip-vit-base-patch32", Item(
        images=[{"data": np.array(pil_image)}]
    ))  # fmt: skip
    results["numpy"] = result

    # Direct image input (shorthand without dict wrapper)
    result = client.encode("openai/clip-vit-base-patch32", Item(
        images=[pil_image, "photo2.jpg"]  # Mixed formats supported
    ))  # fmt: skip
    results["mixed"] = result

    # Multimodal (for CLIP, ColPali, etc.)
    results["multimodal"] = client.encode(
        "openai/clip-vit-base-patch32", Item(text="Description", images=["photo.jpg"])
    )
    client.close()
    return results


def reference_example_vectors(folder: Path) -> dict[str, np.ndarray]:
    """What each example must return: the reference on the bytes the SDK sends (PIL images,
    arrays and paths re-encoded as JPEG; bytes as they are), decoded by PIL."""
    with Image.open("photo.jpg") as opened:
        converted = sent_bytes({"images": [opened.copy()]})[0]
    photo2 = sent_bytes({"images": ["photo2.jpg"]})[0]
    single = want_images(folder, [converted])[0]
    return {
        "pil": single,
        "path": single,
        "bytes": want_images(folder, [Path("photo.jpg").read_bytes()])[0],
        "numpy": single,
        "mixed": clip.reference_item(folder, [clip.decoded(converted), clip.decoded(photo2)]),
        "multimodal": single,
    }


async def test_the_sdk_references_image_examples_run_as_written(
    server: ServerHandle,
    http: BridgeHandle,
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pictures(2)[0].save(tmp_path / "photo.jpg")
    pictures(2)[1].save(tmp_path / "photo2.jpg")
    monkeypatch.chdir(tmp_path)
    want = reference_example_vectors(folders[CLIP])
    for url in (http.url, server.address):
        results = await asyncio.to_thread(run_reference_examples, url)
        assert set(results) == set(want)
        for name, result in results.items():
            assert_close(result["dense"], want[name])


# ---- score: text query vs images, image query vs texts --------------------------------------
def ranked(response: score_pb2.ScoreResponse) -> list[tuple[str, float]]:
    return [(entry.item_id, entry.score) for entry in response.scores]


@pytest.mark.parametrize("model", [CLIP, SIGLIP])
async def test_score_ranks_across_modalities_as_cosine_does(
    server: ServerHandle, model: str, folders: dict[str, Path]
) -> None:
    stub = score_pb2_grpc.ScoreServiceStub(server.channel)
    data = [png(image) for image in pictures(4)]
    image_items = [
        common_pb2.Item(id=f"image-{i}", images=[common_pb2.ImageInput(data=d)])
        for i, d in enumerate(data)
    ]
    text_items = [common_pb2.Item(id=f"text-{i}", text=t) for i, t in enumerate(TEXTS)]
    image_vectors = want_images(folders[model], data)
    text_vectors = clip.reference_texts(folders[model], TEXTS)
    calls = [
        (common_pb2.Item(text=TEXTS[0]), image_items, image_vectors @ text_vectors[0], "image"),
        (image_items[0], text_items, text_vectors @ image_vectors[0], "text"),
    ]
    for query, items, cosine, kind in calls:
        response = await stub.Score(score_pb2.ScoreRequest(model=model, query=query, items=items))
        order = np.argsort(-cosine, kind="stable")
        got = ranked(response)
        assert [item_id for item_id, _ in got] == [f"{kind}-{i}" for i in order]
        np.testing.assert_allclose([score for _, score in got], cosine[order], atol=1e-5)
        assert [entry.rank for entry in response.scores] == list(range(len(items)))


# ---- bad images -----------------------------------------------------------------------------
def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose header announces ``width`` x ``height`` (a decompression bomb's
    header; the IHDR CRC is recomputed so only the size is wrong)."""
    data = bytearray(png(Image.new("RGB", (8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (it does not compress: about 3 bytes a pixel)."""
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels, "RGB"))


def bad_images() -> dict[str, tuple[bytes, str]]:
    """Each bad image, and what the error must say about it."""
    good_png, good_jpeg = png(pictures(1)[0]), jpeg(pictures(1)[0])
    return {
        "corrupt": (b"these bytes are not an image" * 3, "is not a JPEG, PNG or WebP image"),
        "truncated-png": (good_png[: len(good_png) // 2], "truncated"),
        "truncated-jpeg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "over-bytes": (noise_png(200), f"over the limit of {MAX_IMAGE_BYTES} (--max-image-bytes)"),
        "over-pixels": (png(Image.new("RGB", (600, 600))), "600x600 pixels"),
        "bomb": (png_declaring(30_000, 30_000), "is too large"),
    }


BAD = sorted(bad_images())


async def assert_still_serving(stub: Any) -> None:
    response = await stub.Encode(
        encode_pb2.EncodeRequest(model=CLIP, items=[image_proto(png(pictures(1)[0]))])
    )
    assert response.items[0].dense.dims == clip.CLIP_DIMS


@pytest.mark.parametrize("kind", BAD)
async def test_grpc_bad_images_are_invalid_argument_naming_the_item(stub: Any, kind: str) -> None:
    data, problem = bad_images()[kind]
    items = [image_proto(png(pictures(1)[0])), image_proto(data)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(encode_pb2.EncodeRequest(model=CLIP, items=items))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.details() or ""
    assert "item 1: image 0" in message
    assert problem in message
    await assert_still_serving(stub)


@pytest.mark.parametrize("kind", BAD)
async def test_bridge_bad_images_are_400_naming_the_item(
    http: BridgeHandle, stub: Any, kind: str
) -> None:
    data, problem = bad_images()[kind]
    body = {"items": [{"text": "fine"}, {"images": [{"data": data}]}]}
    headers = {"Content-Type": "application/msgpack"}
    async with http.session.post(f"/v1/encode/{CLIP}", data=pack(body), headers=headers) as r:
        assert r.status == 400
        detail = (await r.json())["detail"]
    assert detail["code"] == "INVALID_INPUT"
    assert "item 1: image 0" in detail["message"]
    assert problem in detail["message"]
    await assert_still_serving(stub)


# ---- batching, and a text-only model ---------------------------------------------------------
async def test_32_concurrent_single_image_requests_share_forward_passes(
    stub: Any, server: ServerHandle, folders: dict[str, Path]
) -> None:
    metrics = server.running.registry.metrics
    before = metrics.counter("sie_batches_total", model=CLIP, status="ok")
    data = [jpeg(image) for image in pictures(32)]
    responses = await asyncio.gather(
        *(stub.Encode(encode_pb2.EncodeRequest(model=CLIP, items=[image_proto(d)])) for d in data)
    )
    passes = metrics.counter("sie_batches_total", model=CLIP, status="ok") - before
    assert passes < len(data), f"{passes} forward passes for {len(data)} requests"
    got = np.concatenate([dense_of(response) for response in responses])
    assert_close(got, want_images(folders[CLIP], data))


async def test_a_text_only_model_refuses_images(stub: Any, http: BridgeHandle) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Encode(
            encode_pb2.EncodeRequest(model=TEXT_ONLY, items=[image_proto(png(pictures(1)[0]))])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"item 0: model {TEXT_ONLY} accepts text only" in (caught.value.details() or "")
    body = {"items": [{"images": [{"data": base64.b64encode(b"\x89PNG").decode()}]}]}
    async with http.session.post(f"/v1/encode/{TEXT_ONLY}", json=body, headers=JSON_HEADERS) as r:
        assert r.status == 400
        assert "accepts text only" in (await r.json())["detail"]["message"]


async def test_the_catalog_says_the_models_take_images(http: BridgeHandle) -> None:
    async with http.session.get(f"/v1/models/{CLIP}", headers=JSON_HEADERS) as r:
        info = await r.json()
    assert info["inputs"] == ["text", "image"]
    assert info["dims"]["dense"] == clip.CLIP_DIMS
