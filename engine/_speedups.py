"""Chooses between a compiled wire module and its pure-Python twin (the aiohttp/yarl pattern).

Every module in ``ext/`` builds to ``engine._ext.<name>`` and has a twin with the same names
and behaviour.  A selector module imports the twin's names first (that is what type checkers
see) and then calls :func:`select`, which replaces them with the compiled ones unless
``FERRY_NO_EXTENSIONS`` is set.  ``FERRY_REQUIRE_EXTENSIONS`` turns a missing compiled module
into an ImportError, so a build that quietly fell back to Python cannot pass the compiled
test run.

This module must never import a selector module at import time (they import it).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

#: Compiled modules, each with its selector module (the import path the code uses).
SELECTORS: dict[str, str] = {
    "wire": "engine.protocol.wire",
    "command": "engine.protocol.command",
    "reply": "engine.protocol.reply",
    "headers": "engine.message.headers",
    "canon": "engine.message.canon",
    "logline": "engine.ops.logline",
    "pkey": "engine.message.pkey",
}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


NO_EXTENSIONS = _flag("FERRY_NO_EXTENSIONS")
REQUIRE_EXTENSIONS = _flag("FERRY_REQUIRE_EXTENSIONS")
if NO_EXTENSIONS and REQUIRE_EXTENSIONS:
    raise RuntimeError("FERRY_NO_EXTENSIONS and FERRY_REQUIRE_EXTENSIONS are both set")

#: name → True when the compiled module is the one in use.
active: dict[str, bool] = {}


def compiled(name: str) -> ModuleType | None:
    """The compiled module ``engine._ext.<name>``, or None when disabled or not built."""
    if NO_EXTENSIONS:
        return None
    try:
        return importlib.import_module(f"engine._ext.{name}")
    except ImportError as exc:
        if REQUIRE_EXTENSIONS:
            raise ImportError(
                f"FERRY_REQUIRE_EXTENSIONS is set but engine._ext.{name} is not built "
                f"(pip install -e . builds it): {exc}"
            ) from exc
        return None


def select(name: str, names: list[str], namespace: dict[str, Any]) -> bool:
    """Overwrite ``names`` in a selector's namespace with the compiled module's, if any."""
    module = compiled(name)
    if module is not None:
        for attr in names:
            namespace[attr] = getattr(module, attr)
    active[name] = module is not None
    return module is not None


def status() -> str:
    """One line for ``ferry --version``: which implementation every wire module runs."""
    for selector in SELECTORS.values():
        importlib.import_module(selector)
    on = sorted(n for n in SELECTORS if active.get(n))
    if len(on) == len(SELECTORS):
        return "compiled extensions: active (" + ", ".join(on) + ")"
    why = " (FERRY_NO_EXTENSIONS is set)" if NO_EXTENSIONS else " (not built)"
    if not on:
        return "compiled extensions: inactive, pure Python" + why
    off = sorted(set(SELECTORS) - set(on))
    return "compiled extensions: partial, pure Python for " + ", ".join(off) + why


def pure_module_name(name: str) -> str:
    """Import path of the pure-Python twin of ``name`` (``engine.protocol._wire_py``)."""
    package = SELECTORS[name].rsplit(".", 1)[0]
    return f"{package}._{name}_py"


def implementations(name: str) -> list[tuple[str, ModuleType]]:
    """``[("py", twin), ("c", compiled)]`` for twin tests; "c" absent when not in use."""
    found = [("py", importlib.import_module(pure_module_name(name)))]
    module = compiled(name)
    if module is not None:
        found.append(("c", module))
    return found
