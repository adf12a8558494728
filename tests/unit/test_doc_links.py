"""The README and docs/ point only at files inside the repository, and those files exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT), (page.name, target)
        assert path.exists(), (page.name, target)
    # A path written as code that leaves the repository ("../shared/DESIGN.md").
    assert not re.search(r"`\.\./[^`]*`", text), page.name


def test_the_docs_this_repository_promises_exist() -> None:
    for name in ("configuration.md", "architecture.md", "tls.md"):
        assert (ROOT / "docs" / name).exists()
