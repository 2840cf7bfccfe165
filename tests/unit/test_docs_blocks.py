"""Every code block of README.md and docs/*.md is either run by a test, as written, or says why
not; the configuration excerpts pass the same check the archive command makes."""

import pytest
import yaml

from handlers.packaging.archive import load_spec
from scripts.torchserve_instance import read_properties
from tests.docs_blocks import ROOT, RUNNERS, all_blocks, blocks_named, outputs_in_order


@pytest.mark.parametrize("block", all_blocks(), ids=lambda b: b.where())
def test_every_code_block_is_run_by_a_test_or_says_why_not(block):
    assert block.marker is not None, (
        f"{block.where()}: put <!-- run: NAME --> (one of {sorted(RUNNERS)}) or <!-- not run: WHY --> before it")
    if block.marker == "run":
        assert block.label in RUNNERS, f"{block.where()}: no test runs blocks named {block.label!r}"
    else:
        assert len(block.label) > 10, f"{block.where()}: say why it is not run"


def test_every_runner_has_blocks():
    assert all(blocks_named(name) for name in RUNNERS)


@pytest.mark.parametrize("block", blocks_named("config-check"), ids=lambda b: b.where())
def test_every_config_block_passes_the_check(block, tmp_path):
    if block.language == "properties":
        shipped = read_properties(ROOT / "config.properties")
        written = read_properties_text(block.text, tmp_path)
        assert written.items() <= shipped.items(), f"{block.where()} is not what config.properties says"
        return
    raw = yaml.safe_load(block.text)
    if "model_name" not in raw:  # a model_config excerpt: in the quickstart's config
        quickstart = yaml.safe_load((ROOT / "archiver_configs" / "quickstart.yaml").read_text())
        raw = {**quickstart, "model_config": raw["model_config"]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path, ROOT)
    assert spec.model_config == raw["model_config"]


def read_properties_text(text, tmp_path):
    path = tmp_path / "excerpt.properties"
    path.write_text(text)
    return read_properties(path)


def test_expected_output_is_matched_in_order_whitespace_aside():
    output = 'noise\n{\n  "y": [\n    3.0,\n    5.0\n  ]\n}\nmore\n1 passed\n'
    assert outputs_in_order(['{"y": [3.0, 5.0]}', "1 passed"], output) is None
    assert outputs_in_order(["1 passed", '{"y": [3.0, 5.0]}'], output) == '{"y": [3.0, 5.0]}'
    assert outputs_in_order(['{"y": [3.0, 6.0]}'], output) == '{"y": [3.0, 6.0]}'
