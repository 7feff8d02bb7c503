"""Settings come out of ``load_settings`` typed: choices as their ``Literal`` values, and the
``[routing]`` and ``[analyzer]`` tables as validated records, parsed once at load."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from actors.config import CheckpointerName, MultitaskPolicy, Settings, load_settings
from graph.errors import ConfigError
from graph.features import AnalyzerPolicy
from graph.routing import RoutingConfig


def test_a_choice_is_read_as_its_literal_value() -> None:
    """Case and surrounding blanks do not matter; the value kept is the Literal's spelling."""
    settings = load_settings({"CTXD_CHECKPOINTER": " Memory ", "CTXD_MULTITASK": "ROLLBACK"})
    assert settings.checkpointer == "memory"
    assert settings.multitask == "rollback"
    assert settings.checkpointer in get_args(CheckpointerName)
    assert settings.multitask in get_args(MultitaskPolicy)


def test_a_bad_choice_names_every_allowed_value() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"CTXD_CHECKPOINTER": "sqlite"})
    assert str(caught.value) == (
        "CTXD_CHECKPOINTER='sqlite' is not allowed: expected one of redis, memory, postgres"
    )


def test_without_a_config_file_routing_and_analyzer_are_the_defaults() -> None:
    settings = load_settings({})
    assert settings.routing == RoutingConfig()
    assert settings.analyzer_policy == AnalyzerPolicy()
    assert Settings().routing == RoutingConfig()


def test_routing_and_analyzer_tables_are_parsed_at_load(tmp_path: Path) -> None:
    """The tables arrive as typed records, every other number at its default."""
    config = tmp_path / "ctxd.toml"
    config.write_text(
        "[routing.thresholds.high_quality]\nquality = 0.92\n\n"
        '[analyzer]\ndrift_threshold = "0.8"\niteration_budget = 20\n'
    )
    settings = load_settings({}, config_file=config)
    assert isinstance(settings.routing, RoutingConfig)
    assert settings.routing.thresholds.high_quality.quality == 0.92
    assert (
        settings.routing.thresholds.standard_quality == RoutingConfig().thresholds.standard_quality
    )
    assert settings.analyzer_policy == AnalyzerPolicy(drift_threshold=0.8, iteration_budget=20)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ("[routing.thresholds.high_quality]\nquality = 2.0\n", "routing.thresholds.high_quality"),
        ("[analyzer]\nmax_passes = -1\n", "analyzer"),
        ("[analyzer]\nbudget = 3\n", "analyzer.budget is not a setting"),
        ("routing = 3\n", "[routing] must be a table"),
    ],
)
def test_a_bad_table_stops_loading(tmp_path: Path, table: str, words: str) -> None:
    """A bad routing or analyzer value is a start-up error, like any other setting."""
    config = tmp_path / "ctxd.toml"
    config.write_text(table)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("[", r"\[")):
        load_settings({}, config_file=config)
