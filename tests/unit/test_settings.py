"""Settings from the model config's handler: section, checked once at start-up."""

import pytest

from handlers import ConfigError, EngineSettings
from handlers.engine.settings import usable_cores
from handlers.packaging.server_sections import read_settings


def test_defaults_run_the_whole_batch_on_all_usable_cores():
    settings, options = read_settings(None)
    assert settings.micro_batch_size is None
    assert settings.pool_size == usable_cores() >= 1
    assert settings.inference_workers == 1
    assert settings.deadline_s == 60.0
    assert options == {}


def test_values_are_read_from_the_handler_section():
    config = {"responseTimeout": 300, "handler": {"micro_batch_size": 4, "pool_size": 3, "deadline_s": 90}}
    settings, _ = read_settings(config)
    assert settings == EngineSettings(micro_batch_size=4, pool_size=3, inference_workers=1, deadline_s=90)


def test_whole_means_the_whole_batch():
    settings, _ = read_settings({"handler": {"micro_batch_size": "whole"}})
    assert settings.micro_batch_size is None


def test_the_default_deadline_leaves_room_under_a_short_response_timeout():
    settings, _ = read_settings({"responseTimeout": 10})
    assert settings.deadline_s == pytest.approx(8.0)


@pytest.mark.parametrize("section, message", [
    ({"micro_batch_size": 0}, "handler.micro_batch_size must be an integer >= 1 (or 'whole' for the whole batch), got 0"),
    ({"micro_batch_size": 2.5}, "handler.micro_batch_size must be an integer >= 1"),
    ({"pool_size": -1}, "handler.pool_size must be an integer >= 1, got -1"),
    ({"pool_size": True}, "handler.pool_size must be an integer >= 1, got True"),
    ({"inference_workers": "two"}, "handler.inference_workers must be an integer >= 1, got 'two'"),
    ({"deadline_s": 0}, "handler.deadline_s must be a number > 0, got 0"),
    ({"deadline_s": float("nan")}, "handler.deadline_s must be a number > 0, got nan"),
    ({"deadline_s": 120}, "handler.deadline_s must be shorter than responseTimeout (120 s)"),
    ({"micro_batch": 4}, "handler.micro_batch is not a known setting; known settings: deadline_s, inference_workers"),
])
def test_bad_values_are_refused_with_the_key_the_rule_and_the_value(section, message):
    with pytest.raises(ConfigError) as caught:
        read_settings({"handler": section})
    assert message in str(caught.value)


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError, match="handler must be a mapping"):
        read_settings({"handler": [1, 2]})


def test_a_bad_response_timeout_is_named():
    with pytest.raises(ConfigError, match="responseTimeout must be a number > 0, got 'soon'"):
        read_settings({"responseTimeout": "soon"})


def test_handler_options_take_their_defaults_and_typed_overrides():
    defaults = {"top_k": 5, "threshold": 0.5, "labels": "index_to_name.json", "fast": False}
    _, options = read_settings({"handler": {"top_k": 3, "threshold": 1}}, defaults)
    assert options == {"top_k": 3, "threshold": 1.0, "labels": "index_to_name.json", "fast": False}
    assert isinstance(options["threshold"], float)


@pytest.mark.parametrize("section, message", [
    ({"top_k": "3"}, "handler.top_k must be of type int (like its default 5), got '3'"),
    ({"top_k": True}, "handler.top_k must be of type int (like its default 5), got True"),
    ({"fast": 1}, "handler.fast must be of type bool (like its default False), got 1"),
])
def test_handler_options_of_the_wrong_type_are_refused(section, message):
    with pytest.raises(ConfigError) as caught:
        read_settings({"handler": section}, {"top_k": 5, "fast": False})
    assert message in str(caught.value)
