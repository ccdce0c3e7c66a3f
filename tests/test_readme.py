"""README.md and docs/: the size a reader sees first, links that resolve, and the public names
that README's code imports (a renamed name fails here, not in a user's first session)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_BYTES = 16384

# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def relative_links(path: Path) -> list[str]:
    """The link targets of a markdown file that point into the repository (no URL, no
    mail address, no bare #anchor), without their #fragment."""
    out = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def readme_imports() -> list[tuple[str, str | None]]:
    """(module, name) for every ``from medfm... import name`` in README's python blocks, and
    (module, None) for every ``import medfm...``."""
    out: list[tuple[str, str | None]] = []
    for block in PYTHON_BLOCK.findall(README.read_text(encoding="utf-8")):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "medfm":
                out += [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "medfm"]
    return out


def test_readme_is_short() -> None:
    size = README.stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = relative_links(page)
    missing = [t for t in links if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t).resolve() for t in relative_links(README)}
    for page in ("architecture", "benchmarks", "datasets", "evaluation", "models/medfm-tiny"):
        assert (ROOT / "docs" / f"{page}.md").resolve() in linked, page


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for outside in ("DESIGN.md", "../shared", "shared/data"):
        assert outside not in text, f"{page.relative_to(ROOT)} refers to {outside}"


def test_readme_has_the_two_commands() -> None:
    first = README.read_text(encoding="utf-8").split("```bash\n", 1)[1].split("```", 1)[0]
    assert first.splitlines() == [
        'pip install -e ".[dev]" && medfm synth generate --out synth_demo --modality ct,mri,us '
        "-n 12 --preview",
        "python -m pytest -q",
    ]


def test_readme_imports_found() -> None:
    modules = {m for m, _ in readme_imports()}
    assert {"medfm.synth", "medfm.seg", "medfm.io"} <= modules


@pytest.mark.parametrize("module, name", readme_imports(), ids=lambda x: str(x))
def test_readme_import_works(module: str, name: str | None) -> None:
    mod = importlib.import_module(module)
    if name is not None:
        assert hasattr(mod, name), f"README imports {name} from {module}, which has no such name"
        assert name in getattr(mod, "__all__", [name]), f"{module}.__all__ lacks {name}"
