"""Numeric input: JSON arrays and .npy bytes checked against a declared shape and dtype."""

import io
import json

import numpy as np
import pytest

from handlers import BadRequest, PayloadTooLarge, TensorSpec, parse_array
from handlers.testing import assert_isolates_bad_request, assert_matches_alone, run_batch

SPEC = TensorSpec(shape=(4,), dtype="float32")


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("body", [
    [5.1, 3.5, 1.4, 0.2], b"[5.1, 3.5, 1.4, 0.2]", "[5.1, 3.5, 1.4, 0.2]", {"inputs": [5.1, 3.5, 1.4, 0.2]},
    npy(np.array([5.1, 3.5, 1.4, 0.2], dtype=np.float32)), npy(np.array([5.1, 3.5, 1.4, 0.2])), [5, 3, 1, 0],
])
def test_json_and_npy_bodies_give_the_declared_dtype_and_shape(body):
    array = parse_array(body, SPEC)
    assert array.dtype == np.float32 and array.shape == (4,)


@pytest.mark.parametrize("body, message", [
    ([1.0, 2.0, 3.0], "expected shape [4] of float32, got shape [3]"),
    ([[1.0, 2.0, 3.0, 4.0]], "expected shape [4] of float32, got shape [1, 4]"),
    ([1.0, float("nan"), 3.0, 4.0], "1 NaN or infinite value(s)"),
    (b"[1.0, Infinity, -Infinity, 4.0]", "Infinity is not a JSON number"),  # refused as JSON (issue 29)
    (["a", "b", "c", "d"], "expected numbers"),
    ([[1, 2], [3]], "ragged"),
    ([True, False, True, False], "got booleans"),
    ({"values": [1, 2, 3, 4]}, 'under "inputs"'),
    ("not json", "neither a JSON array nor .npy bytes"),
    (b"", "the body is empty"),
    (npy(np.array([1, 2, 3, 4], dtype=object)), "object arrays are refused"),
    (npy(np.array([1, 2, 3, 4], dtype=np.float32))[:-3], "corrupt or truncated"),
    (npy(np.array([1 + 2j, 0, 0, 0])), "expected numbers"),
])
def test_wrong_input_is_a_400_saying_what_was_expected(body, message):
    with pytest.raises(BadRequest) as caught:
        parse_array(body, SPEC)
    assert message in caught.value.message


def test_integers_are_checked_for_kind_and_range():
    spec = TensorSpec(shape=(2,), dtype="int8")
    assert parse_array([1, -2], spec).dtype == np.int8
    with pytest.raises(BadRequest, match="expected int8 values, got float64"):
        parse_array([1.5, 2.0], spec)
    with pytest.raises(BadRequest, match=r"out of range for int8 \[-128, 127\]"):
        parse_array([1, 300], spec)


def test_a_wildcard_axis_takes_any_length():
    spec = TensorSpec(shape=(-1, 2))
    assert parse_array([[1, 2], [3, 4], [5, 6]], spec).shape == (3, 2)
    with pytest.raises(BadRequest, match=r"expected shape \[\*, 2\]"):
        parse_array([[1, 2, 3]], spec)


def test_too_many_elements_is_a_413():
    with pytest.raises(PayloadTooLarge, match="1,000 elements; the limit is 10"):
        parse_array(list(range(1000)), TensorSpec(max_elements=10))


def test_non_finite_values_pass_when_allowed():
    spec = TensorSpec(shape=(2,), allow_non_finite=True)
    assert np.isnan(parse_array([float("nan"), 1.0], spec)[0])


@pytest.fixture(scope="module")
def tabular(archived_handler):
    return archived_handler("tabular")


@pytest.fixture(scope="module")
def iris_held_out():
    from pathlib import Path

    data = np.load(Path(__file__).resolve().parents[2] / "build" / "tabular" / "held_out.npz")
    return data["features"], data["labels"]


def test_the_tabular_example_names_the_species(tabular, iris_held_out):
    features, labels = iris_held_out
    responses, context = run_batch(tabular, [row.tolist() for row in features])
    names = ["setosa", "versicolor", "virginica"]
    accuracy = np.mean([r["species"] == names[label] for r, label in zip(responses, labels)])
    assert accuracy >= 0.9
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in responses)


def test_tabular_answers_are_the_same_alone_or_in_a_batch_of_32(tabular, iris_held_out):
    features, _ = iris_held_out
    bodies = [features[i % len(features)].tolist() for i in range(32)]
    bodies[7] = npy(features[7])  # .npy and JSON mixed in one batch

    def same(a, b):
        return a["species"] == b["species"] and all(
            abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5 for k in a["probabilities"]
        )

    assert_matches_alone(tabular, bodies, same=same)


@pytest.mark.parametrize("bad_body", [[1, 2, 3], [1, 2, 3, float("inf")], b"{", json.dumps([[1, 2, 3, 4]])])
def test_a_bad_tensor_among_good_ones_gets_its_400(tabular, iris_held_out, bad_body):
    features, _ = iris_held_out
    assert_isolates_bad_request(tabular, [row.tolist() for row in features[:5]], bad_body, 400)


def test_an_npy_header_declaring_a_huge_array_is_a_413_before_it_is_read():
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    with pytest.raises(PayloadTooLarge, match="10,000,000,000 elements"):
        parse_array(stream.getvalue() + b"\x00" * 16, SPEC)


def npy_with_header(header: str) -> bytes:
    """A version 1.0 .npy file whose header text is ``header`` (padded as numpy pads it)."""
    text = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin-1") + bytes(64)


def test_an_npy_header_python_cannot_tokenize_is_a_400_not_a_500():
    # numpy parses the header with Python's tokenize, whose TokenError is no ValueError: that was a 500.
    header = "{{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"  # an unclosed brace
    with pytest.raises(BadRequest, match="the .npy header is corrupt: TokenError"):
        parse_array(npy_with_header(header), SPEC)


def test_an_npy_header_whose_element_count_overflows_int64_is_a_413_not_a_500():
    # np.prod(shape, dtype=int64) raised OverflowError on sizes past 2**63.
    with pytest.raises(PayloadTooLarge, match="elements; the limit is"):
        parse_array(npy_with_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({2**70},), }}"), SPEC)


def test_an_npy_header_declaring_a_gigabyte_per_item_is_a_400_not_a_memory_error():
    # 36 items of a 1 GB void dtype passed the element limit, and np.load allocated 33.5 GiB (a
    # MemoryError, a 500; or, where memory is overcommitted, a 33.5 GiB allocation).
    header = "{'descr': '<V1000000000', 'fortran_order': False, 'shape': (3, 3, 4), }"
    with pytest.raises(BadRequest, match="expected numbers"):
        parse_array(npy_with_header(header), SPEC)


def test_an_npy_body_shorter_than_its_header_declares_is_a_400_before_it_is_read():
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000, 1000), }"  # 4 MB declared, 64 bytes sent
    with pytest.raises(BadRequest, match="declares 4,000,000 bytes, the body holds 64"):
        parse_array(npy_with_header(header), TensorSpec(shape=(-1, -1), dtype="float32"))


@pytest.mark.parametrize("body, words", [
    ([1, "a", 3, 4], "got strings (numpy type <U"),
    ([1, None, 3, 4], "got mixed values (numpy type object)"),
])
def test_values_that_are_not_numbers_are_named_in_the_clients_words(body, words):
    """Regression (a new user's trial): `[1, "a"]` was refused as "values of type <U21"."""
    with pytest.raises(BadRequest) as caught:
        parse_array(body, SPEC)
    assert words in caught.value.message
