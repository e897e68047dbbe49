"""The documentation cannot silently rot: every public name has an entry (a heading) in
docs/api.md, every `dp-attn` subcommand too, and every relative link in README.md and docs/*.md
points to a file that exists."""

import importlib
import re
from pathlib import Path

import pytest

from dp_attn.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
PUBLIC_MODULES = (
    "dp_attn",
    "dp_attn.functional",
    "dp_attn.nn",
    "dp_attn.engine",
    "dp_attn.accounting",
    "dp_attn.audit",
    "dp_attn.integrations.transformers",
    "dp_attn.distributed",
)
# [text](target): the target up to the first space or closing parenthesis.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} must list its public names in __all__"
    return list(module.__all__)


def api_headings() -> str:
    return "\n".join(line for line in API.read_text().splitlines() if line.startswith("#"))


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_an_entry_in_the_api_reference(module_name):
    headings = api_headings()
    names = public_names(module_name)
    assert names, f"{module_name} exports nothing: is the module list stale?"
    missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", headings)]
    assert not missing, f"docs/api.md has no heading for {module_name}: {missing}"
    assert f"`{module_name}`" in headings, f"docs/api.md has no section for {module_name}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_name_in_all_exists(module_name):
    module = importlib.import_module(module_name)
    missing = [n for n in public_names(module_name) if not hasattr(module, n)]
    assert not missing, f"{module_name}.__all__ lists names it does not have: {missing}"


def test_the_root_exports_all_of_functional_and_the_engine():
    import dp_attn
    from dp_attn import engine, functional

    engine_names = {"DPOptimizer", "PoissonDataLoader", "PrivacyEngine"}
    assert set(dp_attn.__all__) == {*functional.__all__, *engine_names}
    for name in functional.__all__:
        assert getattr(dp_attn, name) is getattr(functional, name)
    assert dp_attn.PrivacyEngine is engine.PrivacyEngine
    namespace: dict = {}
    exec("from dp_attn import *", namespace)
    assert set(dp_attn.__all__) <= set(namespace)


def test_flash_attention_is_exported_at_the_root():
    import dp_attn
    from dp_attn import functional

    assert dp_attn.flash_attention is functional.flash_attention
    assert "flash_attention" in dir(dp_attn)


def test_every_cli_subcommand_has_an_entry_in_the_api_reference():
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    headings = api_headings()
    missing = [c for c in subparsers.choices if f"`dp-attn {c}`" not in headings]
    assert not missing, f"docs/api.md has no heading for the commands {missing}"


def markdown_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    return files + ([ROOT / "README.md"] if (ROOT / "README.md").exists() else [])


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_link_pattern_finds_relative_links():
    text = "see [the page](docs/x.md#part) and [site](https://a.b/c) and [a](#top 'title')"
    assert LINK.findall(text) == ["docs/x.md#part", "https://a.b/c", "#top"]
