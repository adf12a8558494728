"""Durations with units ("30s", "5m", "4h", "5d") in every duration key and flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import Config, ConfigError, DeliveryConfig, ReceiveConfig, load_config

#: Every duration key: the table it is in, and whether 0 ("off") is allowed.
DURATION_KEYS = [
    ("receive", f.name) for f in dataclasses.fields(ReceiveConfig)
    if "Seconds" in str(f.type)
] + [("delivery", f.name) for f in dataclasses.fields(DeliveryConfig) if "Seconds" in str(f.type)]


def load(tmp_path: Path, text: str, flags: dict[str, object] | None = None) -> Config:
    path = tmp_path / "ferry.toml"
    path.write_text(text)
    return load_config(path, flags)


def table(where: str, key: str, value: str) -> str:
    return (f"[[receive]]\n{key} = {value}\n" if where == "receive"
            else f"[{where}]\n{key} = {value}\n")


def test_every_duration_key_is_found() -> None:
    names = {key for _, key in DURATION_KEYS}
    assert {"idle_timeout", "data_timeout", "data_rate_grace", "greet_delay", "retry_interval",
            "max_retry_interval", "max_queue_lifetime", "down_period",
            "delay_notice_after"} <= names


@pytest.mark.parametrize(("where", "key"), DURATION_KEYS)
@pytest.mark.parametrize(("text", "seconds"), [
    ('"30s"', 30.0), ('"5m"', 300.0), ('"4h"', 14400.0), ('"5d"', 432000.0),
    ('"1h30m"', 5400.0), ('"1.5h"', 5400.0), ('"2 m"', 120.0), ("45", 45.0), ("2.5", 2.5),
])
def test_units_in_every_duration_key(tmp_path: Path, where: str, key: str, text: str,
                                     seconds: float) -> None:
    extra = ""
    if key == "delay_notice_after":
        extra = "max_queue_lifetime = \"30d\"\n"
    config = load(tmp_path, table(where, key, text) + extra)
    section = config.receive[0] if where == "receive" else config.delivery
    assert getattr(section, key) == seconds


@pytest.mark.parametrize(("where", "key"), DURATION_KEYS)
@pytest.mark.parametrize("text", ['"5x"', '"1h30"', '"m"', '""', '"-5m"', "true"])
def test_bad_durations_name_the_key(tmp_path: Path, where: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, table(where, key, text))
    dotted = f"receive[0].{key}" if where == "receive" else f"delivery.{key}"
    (line,) = info.value.problems
    assert line.startswith(f"{dotted}: must be ")
    assert '"30s", "5m", "4h", "5d"' in line and f"(got {text})" in line


def test_flag_takes_units_and_a_bad_one_names_the_flag(tmp_path: Path) -> None:
    assert load(tmp_path, "", {"--retry-interval": "5m"}).delivery.retry_interval == 300.0
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "", {"--retry-interval": "5 minutes"})
    assert info.value.problems[0].startswith("delivery.retry_interval (--retry-interval): ")


def test_cross_check_compares_seconds_whatever_the_units(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, '[delivery]\nmax_queue_lifetime = "1d"\ndelay_notice_after = "24h"\n')
    assert info.value.problems[0].startswith("delivery.delay_notice_after: must be shorter")
