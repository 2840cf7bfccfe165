"""Fuzzing what clients send, short profile (``python -m bench.fuzz`` is the long one): mutated
JPEG/PNG files, generated text and JSON through the ready-made handlers' per-request paths. Each
request gets a well-formed item or its own 400/413/415, never another exception (a 500).

Image cases are reproducible alone: ``image_case(seed, index)`` from tests/fuzz_inputs.py, or
``python -m bench.fuzz --only image --seed SEED --start INDEX --cases 1``; Hypothesis prints the
smallest failing text or JSON body."""

import pytest

from handlers.testing import run_batch

from ..fuzz_inputs import (
    IMAGE_MUTATIONS, TENSOR_VALUES, TEXTS, check_tensor_request, check_text_request, fuzz_images, image_case,
    image_request, run_strategy, start_image_handler, start_text_handler, tensor_requests, text_requests,
)

IMAGE_SEED = 20240611
IMAGE_CASES = 1200
TEXT_CASES = 400
TENSOR_CASES = 600


@pytest.fixture(scope="module")
def image_handler():
    handler = start_image_handler(crop=56, resize=64)
    yield handler
    handler.close()


@pytest.fixture(scope="module")
def text_handler():
    handler = start_text_handler(max_tokens=128)
    yield handler
    handler.close()


def test_mutated_jpeg_and_png_files_decode_to_pixels_or_get_a_4xx(image_handler):
    tally = fuzz_images(image_handler, IMAGE_SEED, IMAGE_CASES, crop=56)
    print(f"\nimages, seed {IMAGE_SEED}:\n{tally.table()}")  # shown with pytest -s
    assert not tally.unexpected, "\n".join([tally.table(), *tally.unexpected[:20]])
    assert set(tally.cases) == set(IMAGE_MUTATIONS)
    # Both outcomes are common: the mutations neither all break the files nor all miss.
    assert sum(tally.ok.values()) > IMAGE_CASES // 5 and sum(tally.refused.values()) > IMAGE_CASES // 5, tally.table()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns on each corrupt EXIF block it skips
def test_mutated_images_in_one_batch_get_200_or_their_own_4xx(image_handler):
    bodies = [image_request(image_case(IMAGE_SEED, index)[2], index) for index in range(24)]
    responses, context = run_batch(image_handler, bodies)  # also checks each error body's code
    statuses = context.statuses()
    assert set(statuses) <= {200, 400, 413, 415}, list(zip(range(24), statuses, responses))
    assert 200 in statuses and len(set(statuses)) > 1


def test_generated_text_is_tokenized_or_gets_a_4xx(text_handler):
    tally = run_strategy(text_requests(), lambda t, case: check_text_request(t, text_handler, case), TEXT_CASES,
                         stop_at_first=True)
    print(f"\ntext:\n{tally.table()}")
    assert not tally.unexpected
    assert set(TEXTS) | {"invalid UTF-8 bytes", 'JSON {"text": non-string}'} <= set(tally.cases), tally.table()
    # All but the few whose JSON escapes happen to pair up into one valid character.
    assert tally.refused["lone surrogates"] >= 0.9 * tally.cases["lone surrogates"] > 0, tally.table()


def test_generated_json_and_npy_bodies_parse_to_the_spec_or_get_a_4xx():
    tally = run_strategy(tensor_requests(), check_tensor_request, TENSOR_CASES, stop_at_first=True)
    print(f"\ntensors:\n{tally.table()}")
    assert not tally.unexpected
    kinds = {kind.split(" (")[0] for kind in tally.cases}
    assert set(TENSOR_VALUES) | {".npy"} <= kinds, tally.table()
    assert sum(tally.ok.values()) > 0, tally.table()
