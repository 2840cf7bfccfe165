"""One good request per example model, and a check that an answer is right for it."""

import json


GOOD = {
    "tabular": ([5.1, 3.5, 1.4, 0.2], lambda answer: answer["species"] == "setosa"),
    "text_embedding": ("A man is playing a guitar.", lambda answer: len(answer["embedding"]) == 384),
    "quickstart": ({"id": "good", "x": [1, 2, 3, 4]}, lambda answer: answer == {"id": "good", "y": [3.0, 5.0, 7.0, 9.0]}),
}


def good_digit():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
    from digits_data import digit_png, split

    _, _, images, labels = split()
    return digit_png(images[0]), str(labels[0])


def good_photo():
    """A real photo (scikit-learn's china.jpg) as JPEG bytes."""
    from .unit.images import encode, photo

    return encode(photo(0, (640, 427)), "JPEG", quality=90)


def good_request(model):
    """``(body bytes, content type, check(answer) -> bool)``."""
    if model == "image_classifier":  # random weights: any five ranked labels are right
        return good_photo(), "image/jpeg", lambda answer: len(answer) == 5 and answer[0]["probability"] >= answer[-1]["probability"]
    if model == "digits":
        png, label = good_digit()
        return png, "image/png", lambda answer: answer[0]["label"] == label
    body, check = GOOD[model]
    if isinstance(body, str):
        return body.encode(), "text/plain", check
    return json.dumps(body).encode(), "application/json", check
