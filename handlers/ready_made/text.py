"""Ready-made text handlers: sentence embeddings and sequence classification, with a Hugging
Face tokenizer per request on the pool and padding per micro-batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from handlers.core.client_data import parsing_client_data
from handlers.core.handler import MicroBatchHandler
from handlers.core.loading import read_labels
from handlers.core.request import Request
from handlers.engine.settings import ConfigError
from handlers.ready_made.text_input import pad_to_longest, request_text


@dataclass(frozen=True)
class TextItem:
    ids: list


class TextHandler(MicroBatchHandler):
    """Base for text models: the archive carries ``tokenizer.json`` and a Hugging Face model
    folder's files (``config.json``, ``model.safetensors``) at its root.

    A request is UTF-8 text, a JSON string or ``{"text": "..."}``. Over ``max_chars`` → 413;
    tokens beyond ``max_tokens`` are truncated (as the model was trained).
    """

    options = {"tokenizer": "tokenizer.json", "max_tokens": 256, "max_chars": 20_000}

    @classmethod
    def check_options(cls, options: dict) -> None:
        super().check_options(options)
        for key in ("max_tokens", "max_chars"):
            if options[key] < 1:
                raise ConfigError(f"handler.{key} must be >= 1, got {options[key]!r}")

    def setup(self, model_dir: str) -> None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(model_dir, self.config["tokenizer"]))
        tokenizer.no_padding()  # padding happens per micro-batch, to its longest sequence
        tokenizer.enable_truncation(max_length=self.config["max_tokens"])
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0

    def load_model(self, model_dir: str, device: torch.device):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the archive, never fetched
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_dir)

    def size_hint(self, request: Request) -> float:
        """The text's length: micro-batches of like lengths pad less."""
        body = request.body
        if isinstance(body, dict):
            body = body.get("text", "")
        return float(len(body)) if isinstance(body, (str, bytes, bytearray)) else 0.0

    def preprocess_one(self, request: Request) -> TextItem:
        text = request_text(request.body, self.config["max_chars"], request.header("Content-Type"))
        with parsing_client_data("the tokenizer could not read the text"):
            # encode_batch releases the GIL while it tokenises (encode holds it): the other pool
            # threads and the model thread run meanwhile. One text: each request its own error.
            [encoding] = self.tokenizer.encode_batch([text])
        ids = encoding.ids
        return TextItem(ids)

    def collate(self, items: list) -> dict:
        ids, mask = pad_to_longest([item.ids for item in items], self.pad_id)
        return {
            "input_ids": self.to_model(torch.from_numpy(ids)),
            "attention_mask": self.to_model(torch.from_numpy(mask)),
        }


class SentenceEmbeddingHandler(TextHandler):
    """Sentence embeddings: mean of the token vectors (padding excluded), L2-normalised, as in
    sentence-transformers. The answer is ``{"embedding": [...]}``."""

    def infer(self, batch: dict) -> torch.Tensor:
        hidden = self.model(**batch).last_hidden_state
        return mean_pooled_unit_vectors(hidden, batch["attention_mask"])

    def postprocess_one(self, output: torch.Tensor, item: TextItem) -> dict:
        return {"embedding": output.tolist()}


class TextClassifierHandler(TextHandler):
    """Sequence classification: ``{"label": "positive", "index": 1, "score": 0.97}`` plus every
    label's score. Labels come from ``index_to_name.json`` or the model config's ``id2label``."""

    options = {"labels": "index_to_name.json"}

    def setup(self, model_dir: str) -> None:
        super().setup(model_dir)
        self.labels = read_labels(model_dir, self.config["labels"])

    def load_model(self, model_dir: str, device: torch.device):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        if not self.labels:
            self.labels = {int(k): v for k, v in model.config.id2label.items()}
        return model

    def infer(self, batch: dict) -> torch.Tensor:
        return torch.softmax(self.model(**batch).logits.float(), dim=-1)

    def postprocess_one(self, output: torch.Tensor, item: TextItem) -> dict:
        scores = output.tolist()
        best = int(np.argmax(scores))
        return {
            "label": self.labels.get(best, str(best)),
            "index": best,
            "score": round(scores[best], 6),
            "scores": {self.labels.get(i, str(i)): round(s, 6) for i, s in enumerate(scores)},
        }


def mean_pooled_unit_vectors(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # In float32, as the classifiers' softmax: a sum over 256 tokens of float16 values overflows
    # float16 (max 65504) to inf, and the normalised vector to NaN, a 200 of nulls.
    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)
