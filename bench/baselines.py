"""The baselines we measure against, written the way TorchServe's stock handlers work.

``SequentialHandler``: TorchServe's ``BaseHandler`` pattern (``VisionHandler``,
``ImageClassifier``): decode each request in a Python loop at full size, transform it to a float
tensor, stack, infer the whole batch, postprocess in a loop. Subclasses give the per-item steps.

``microbatched``: that same handler wrapped in TorchServe's own
``ts.handler_utils.micro_batching.MicroBatching``, configured as its example does (micro-batch
4, threads preprocess 2 / inference 1 / postprocess 2).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from handlers.core.loading import load_model_files, read_labels
from handlers.servers.torchserve import device_for, model_files_from_manifest

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class SequentialHandler:
    """TorchServe's BaseHandler shape: ``handle`` = preprocess loop → one inference → postprocess loop."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        self.device = device_for(properties)
        self.model_dir = properties.get("model_dir", ".")
        self.model = load_model_files(self.model_dir, model_files_from_manifest(context.manifest), self.device).to(self.device).eval()
        self.labels = read_labels(self.model_dir, "index_to_name.json")
        self.initialized = True

    def preprocess(self, data):
        return torch.stack([self.preprocess_one(row.get("data") or row.get("body")) for row in data]).to(self.device)

    def inference(self, batch):
        with torch.inference_mode():
            return self.model(batch)

    def postprocess(self, output):
        return [self.postprocess_one(row) for row in output]

    def handle(self, data, context):
        return self.postprocess(self.inference(self.preprocess(data)))


class SequentialImageClassifier(SequentialHandler):
    """Like TorchServe's ``ImageClassifier``: PIL decode at full size, resize 256, crop 224,
    to float, normalise, per request; softmax and top-5 per request."""

    resize, crop, top_k = 256, 224, 5

    def preprocess_one(self, body):
        image = Image.open(io.BytesIO(body))
        image = ImageOps.exif_transpose(image).convert("RGB")
        scale = self.resize / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - self.crop) // 2, (image.height - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        return (pixels - IMAGENET_MEAN) / IMAGENET_STD

    def postprocess_one(self, logits):
        probabilities, indices = torch.topk(torch.softmax(logits, dim=0), self.top_k)
        return [
            {"label": self.labels.get(i, str(i)), "index": i, "probability": round(p, 6)}
            for p, i in zip(probabilities.tolist(), indices.tolist())
        ]


class SequentialTensorHandler(SequentialHandler):
    """A hand-written loop: JSON → tensor per request, one model call, ``tolist`` per request."""

    def preprocess_one(self, body):
        payload = json.loads(body) if isinstance(body, (bytes, bytearray, str)) else body
        return torch.as_tensor(payload, dtype=torch.float32)

    def postprocess_one(self, output):
        return output.tolist()


class SequentialTextEmbedder(SequentialHandler):
    """The stock transformer-handler shape: tokenise each request, pad the batch to its longest,
    one model call, pooled vectors per request."""

    def initialize(self, context) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModel

        properties = context.system_properties
        self.device = device_for(properties)
        model_dir = properties.get("model_dir", ".")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = AutoModel.from_pretrained(model_dir).to(self.device).eval()
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=256)

    def preprocess(self, data):
        texts = [row.get("data") or row.get("body") for row in data]
        texts = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else t for t in texts]
        encodings = [self.tokenizer.encode(text).ids for text in texts]
        longest = max(len(ids) for ids in encodings)
        ids = torch.zeros(len(encodings), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(encodings):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def inference(self, batch):
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    def postprocess_one(self, vector):
        return {"embedding": vector.tolist()}


class MicroBatchedBaseline:
    """A sequential handler behind TorchServe's own MicroBatching (its example's settings)."""

    def __init__(self, handler: SequentialHandler, micro_batch_size: int = 4):
        from ts.handler_utils.micro_batching import MicroBatching

        self.handler = handler
        self.micro_batching = MicroBatching(
            handler, micro_batch_size=micro_batch_size,
            parallelism={"preprocess": 2, "inference": 1, "postprocess": 2},
        )

    def handle(self, data, context):
        return self.micro_batching.handle(data)

    def close(self):
        self.micro_batching.shutdown()
