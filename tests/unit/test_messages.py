"""Messages a client can act on (issue 19, item 6): each names what was wrong in the client's
terms (JSON's words, the Content-Type sent) and what to send instead."""

import pytest

from handlers import BadRequest, Request
from handlers.core.request import NO_BODY
from handlers.ready_made.image_classifier import requested_top_k
from handlers.ready_made.image_input import image_bytes
from handlers.testing import LocalServer

from .models import AffineHandler


def test_malformed_json_sent_as_json_to_the_image_handler_is_a_400_saying_so_not_a_415():
    """Regression: it was a 415 "not an image format"."""
    with pytest.raises(BadRequest, match="sent as application/json but is not valid JSON"):
        image_bytes(b'{"image": "AAAA', "application/json")


def test_plain_text_to_the_image_handler_says_what_to_send():
    """Regression: "hello" as text/plain got "the image is not valid base64" and no way forward."""
    with pytest.raises(BadRequest) as refused:
        image_bytes("hello", "text/plain; charset=utf-8")
    assert "a text/plain body is read as a base64 image, and this one is not base64" in refused.value.message
    assert 'send the image bytes (e.g. Content-Type: image/jpeg) or JSON {"image": "<base64>"}' in refused.value.message


@pytest.mark.parametrize("body, content_type", [(b"", "application/json"), (b"  \n", "application/json"),
                                                ("", "text/plain")])
def test_an_empty_body_to_a_json_handler_says_it_is_empty(body, content_type):
    """Regression: "Expecting value: line 1 column 1 (char 0)"."""
    with pytest.raises(BadRequest, match="^the body is empty: expected JSON$"):
        Request(body, {"Content-Type": content_type}).json()


def test_a_bad_top_k_is_quoted_as_json():
    """Regression: top_k: true was answered "got True" (Python's spelling)."""
    with pytest.raises(BadRequest, match="got true$"):
        requested_top_k(Request({"top_k": True}), 5)


def test_a_top_k_beyond_the_classes_is_refused_not_silently_capped():
    with pytest.raises(BadRequest, match=r"top_k must be at most 1000 \(the number of classes\), got 1000000"):
        requested_top_k(Request({"top_k": 1_000_000}), 5, classes=1000)
    assert requested_top_k(Request({"top_k": 1000}), 5, classes=1000) == 1000


def test_a_form_post_is_told_it_came_as_a_form():
    """Regression: a form post (curl -d without a Content-Type) was told "the request has no
    body", though it had one."""
    with LocalServer.start(AffineHandler) as server:
        [response] = server.send([NO_BODY])
    assert response.status == 415
    assert response.body["message"].startswith("the request came as a form (fields, no raw body)")
    assert "curl -d without -H 'Content-Type: ...' sends a form" in response.body["message"]
