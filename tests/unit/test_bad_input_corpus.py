"""The bad-input corpus through each example's handler (unpacked from its archive): every bad
request gets its status and a message naming the problem; its batch-mates are answered right."""

import pytest

from handlers.testing import run_batch

from ..corpus.bad_inputs import corpus
from ..good_inputs import good_request

CASES = [item for item in corpus() if not item.frontend_only]


def test_the_corpus_has_at_least_25_kinds_across_the_handlers():
    assert len(corpus()) >= 25
    assert {item.model for item in corpus()} == {"digits", "tabular", "text_embedding", "quickstart"}


def assert_answered_beside_good_ones(handler, item) -> None:
    """``item`` third in a batch of four: its own status (and words), the others their answers."""
    good, good_type, is_right = good_request(item.model)
    bodies = [good, good, item.body, good]
    types = [good_type, good_type, item.content_type, good_type]
    responses, context = run_batch(handler, bodies, headers=[{"Content-Type": t} for t in types])
    assert context.statuses() == [200, 200, item.status, 200], responses[2]
    for position in (0, 1, 3):
        assert is_right(responses[position])
    if item.status != 200:
        assert responses[2]["code"] == item.status
        assert item.words in responses[2]["message"]


@pytest.mark.parametrize("item", CASES, ids=[item.kind for item in CASES])
def test_a_bad_input_gets_its_answer_and_its_batch_mates_theirs(archived_handler, item):
    handler = archived_handler(item.model)
    assert_answered_beside_good_ones(handler, item)


@pytest.fixture(scope="module")
def compiled_handler(model_store, tmp_path_factory):
    """``compiled_handler("digits")``: that example's archive with ``handler.compile`` on
    (backend aot_eager: dynamo's tracing, the buckets and padding, without inductor's minutes of
    code generation), started as a worker would."""
    import zipfile

    import yaml

    from handlers.testing import start_archived_handler

    started = {}

    def start(model_name):
        if model_name not in started:
            folder = tmp_path_factory.mktemp(f"compiled_{model_name}")
            mar = folder / f"{model_name}.mar"
            with zipfile.ZipFile(model_store / f"{model_name}.mar") as source, zipfile.ZipFile(mar, "w") as target:
                for entry in source.infolist():
                    data = source.read(entry)
                    if entry.filename.endswith(".yaml") and b"handler" in data:
                        config = yaml.safe_load(data)
                        config.setdefault("handler", {})["compile"] = {"backend": "aot_eager", "buckets": [2, 4]}
                        data = yaml.safe_dump(config).encode()
                    target.writestr(entry, data)
            started[model_name] = start_archived_handler(mar, folder / "unpacked")
        return started[model_name]

    yield start
    for handler in started.values():
        handler.close()


@pytest.mark.parametrize("item", CASES, ids=[item.kind for item in CASES])
def test_a_bad_input_gets_its_answer_and_its_batch_mates_theirs_on_the_compiled_path(compiled_handler, item):
    handler = compiled_handler(item.model)
    assert handler.compiled is not None and handler.compiled.sizes == (2, 4)
    assert_answered_beside_good_ones(handler, item)
