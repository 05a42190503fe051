"""The image workload of the scoreboard's other workloads (``bench_tasks``): images/s of a
CLIP ViT-B/32 image tower over gRPC against the same model in process at its best batch.

The model is ``openai/clip-vit-base-patch32``'s architecture (``CLIPConfig``'s defaults: vision
ViT-B/32 at 224 pixels, 12 layers, hidden 768; text 12 layers, hidden 512; projection 512) with
random weights, saved with a CLIP image processor (the PIL backend: no torchvision here) and the
MiniLM WordPiece tokenizer (CLIP's BPE files are not offline; the text tower is not timed).

The images are synthetic photos: 640x480 JPEGs (quality 90) of smooth gradients with noise, so
that decoding costs what a camera picture of that size costs. One request is one image, sent as
its JPEG bytes. Both sides start from the same bytes: the library row decodes them with PIL, runs
the processor and ``get_image_features`` (normalised) at batch 1/8/16/32 (quick: 1/8/32), as a
user would in process; the server decodes in its image pool and batches requests.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_tasks import LibraryRow, TaskProfile, Workload, _untyped, cycled, minilm_tokenizer, timed
from sie_sdk.tensors import from_tensor
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

IMAGES = 64
IMAGE_SIZE = (640, 480)
JPEG_QUALITY = 90


def synthetic_photos(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of IMAGE_SIZE: a random colour gradient plus noise each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    out = []
    for _ in range(count):
        a, b, c = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
        pixels = a * x + b * y + c * (1 - x) * (1 - y) + rng.normal(0, 12, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        out.append(buffer.getvalue())
    return out


class ImageWorkload(Workload):
    name = "image"
    unit = "images"
    library = "transformers CLIPModel.get_image_features"

    def __init__(self) -> None:
        self.images = synthetic_photos(IMAGES)
        super().__init__("bench/clip-vit-base-patch32-random", [[str(i)] for i in range(IMAGES)])
        self.folder = Path()
        self.reference: list[np.ndarray[Any, Any]] = []

    def build(self, folder: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        torch.manual_seed(0)
        minilm_tokenizer().save_pretrained(folder / "tokenizer")
        # CLIP's text length and input names, as the real tokenizer has them.
        tokenizer = AutoTokenizer.from_pretrained(
            folder / "tokenizer",
            model_input_names=["input_ids", "attention_mask"],
            model_max_length=77,
        )
        config = _untyped(CLIPConfig)()
        config.text_config.vocab_size = len(tokenizer)
        config.text_config.pad_token_id = tokenizer.pad_token_id
        config.text_config.eos_token_id = tokenizer.sep_token_id
        config.text_config.bos_token_id = tokenizer.cls_token_id
        model = _untyped(CLIPModel)(config)
        model.eval().save_pretrained(folder)
        images = _untyped(CLIPImageProcessorPil)()
        _untyped(CLIPProcessor)(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
        self.folder = folder
        vision = config.vision_config
        self.info["shape"] = {
            "layers": vision.num_hidden_layers,
            "hidden": vision.hidden_size,
            "heads": vision.num_attention_heads,
            "intermediate": vision.intermediate_size,
        }
        self.info["vocab"] = len(tokenizer)
        # The vision tower's tokens: one per patch and the class token.
        self.info["tokens_per_item"] = (vision.image_size // vision.patch_size) ** 2 + 1
        self.info["jpeg_kb"] = float(np.mean([len(b) for b in self.images]) / 1024)
        return {
            "name": self.model,
            "adapter": "clip",
            "weights_path": str(folder),
            "inputs": ["text", "image"],
            "max_sequence_length": 77,
            "outputs": {"dense": {"dims": config.projection_dim, "similarity": "cosine"}},
            "profiles": {"default": {"output_types": ["dense"]}},
        }

    def run_library(self, profile: TaskProfile) -> list[LibraryRow]:
        import torch
        from PIL import Image
        from transformers import CLIPModel
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        model = _untyped(CLIPModel).from_pretrained(self.folder).eval()
        processor = _untyped(CLIPImageProcessorPil).from_pretrained(self.folder)

        def embed(chunk: Sequence[bytes], batch: int) -> list[np.ndarray[Any, Any]]:
            out: list[np.ndarray[Any, Any]] = []
            for start in range(0, len(chunk), batch):
                pictures = [
                    Image.open(io.BytesIO(b)).convert("RGB") for b in chunk[start : start + batch]
                ]
                pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
                with torch.inference_mode():
                    features = model.get_image_features(pixel_values=pixels)
                    if not isinstance(features, torch.Tensor):
                        features = features.pooler_output
                    features = torch.nn.functional.normalize(features, dim=-1)
                out += list(features.float().numpy())
            return out

        rows = []
        for batch in profile.batches:
            if batch > 32:
                continue
            chunk = cycled(self.images, profile.chunk(batch))
            embed(chunk[:batch], batch)
            done, elapsed = timed(
                functools.partial(embed, chunk, batch), len(chunk), profile.inproc_s
            )
            rows.append(self.row(f"{self.library}, batch {batch}", batch, done, elapsed))
        self.reference = embed(self.images[:2], 2)
        return rows

    def request(self, texts: Sequence[str]) -> Any:
        image = common_pb2.ImageInput(data=self.images[int(texts[0])], format="jpeg")
        return encode_pb2.EncodeRequest(model=self.model, items=[common_pb2.Item(images=[image])])

    def stub_call(self, channel: grpc.aio.Channel) -> Any:
        return encode_pb2_grpc.EncodeServiceStub(channel).Encode

    def count(self, reply: Any) -> int:
        return len(reply.items)

    def check(self, replies: Sequence[Any]) -> str:
        cosines = []
        for reply, want in zip(replies, self.reference, strict=False):
            got = from_tensor(reply.items[0].dense.values).astype(np.float32)
            cosines.append(float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))))
        self.info["min_cosine"] = min(cosines)
        return f"min cosine to get_image_features over {len(cosines)} images: {min(cosines):.6f}"
