"""The compiled/pure selection: the compiled run must really run compiled code."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from engine import _speedups


def test_compiled_modules_loaded_when_required() -> None:
    """The aiohttp ``test_c_parser_loaded`` check: no quiet fallback to Python."""
    if not _speedups.REQUIRE_EXTENSIONS:
        pytest.skip("FERRY_REQUIRE_EXTENSIONS is not set: either implementation may run")
    for name, selector in _speedups.SELECTORS.items():
        module = importlib.import_module(selector)
        assert module.COMPILED, f"{name}: compiled module required but not in use"
        assert _speedups.active[name]


def test_pure_modules_when_extensions_are_off() -> None:
    if not _speedups.NO_EXTENSIONS:
        pytest.skip("FERRY_NO_EXTENSIONS is not set: either implementation may run")
    for name, selector in _speedups.SELECTORS.items():
        module = importlib.import_module(selector)
        assert not module.COMPILED, name
        assert not _speedups.active[name]


def test_selected_names_come_from_the_chosen_implementation() -> None:
    for name, selector in _speedups.SELECTORS.items():
        module = importlib.import_module(selector)
        chosen = dict(_speedups.implementations(name))["c" if module.COMPILED else "py"]
        for attr in module.__all__:
            assert getattr(module, attr) is getattr(chosen, attr), (name, attr)


def test_require_turns_a_missing_module_into_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_speedups, "NO_EXTENSIONS", False)
    monkeypatch.setattr(_speedups, "REQUIRE_EXTENSIONS", True)
    with pytest.raises(ImportError, match="FERRY_REQUIRE_EXTENSIONS"):
        _speedups.compiled("no_such_module")
    monkeypatch.setattr(_speedups, "REQUIRE_EXTENSIONS", False)
    assert _speedups.compiled("no_such_module") is None


def test_both_switches_at_once_is_an_error() -> None:
    env = dict(os.environ, FERRY_NO_EXTENSIONS="1", FERRY_REQUIRE_EXTENSIONS="1")
    proc = subprocess.run([sys.executable, "-c", "import engine._speedups"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "both set" in proc.stderr


@pytest.mark.parametrize(("switch", "expected"), [
    ("FERRY_NO_EXTENSIONS", "compiled extensions: inactive, pure Python"),
    ("FERRY_REQUIRE_EXTENSIONS", "compiled extensions: active"),
])
def test_version_says_which_implementation_runs(switch: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env[switch] = "1"
    proc = subprocess.run([sys.executable, "-m", "engine", "--version"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("ferry 0.1.0 (Python ")
    assert second.startswith(expected)
