"""The README and the MkDocs pages (docs/pages/) against the tree they describe.

MkDocs' strict build (`make test`) checks the links between pages and their anchors; it cannot see the README
nor the repository paths, module names, settings and metrics the pages name as code. These tests do.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from oodserve.config import Settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = REPO / "docs" / "pages"
MAX_README_LINES = 250

# Inline links and images, [text](target) or ![alt](target "title"); reference-style links are not used.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path into the repository: one of its top-level folders, not inside a URL, a module name or a longer path.
REPO_PATH = re.compile(r"(?<![\w./-])((?:service|models|benchmarks|deploy|tests|docs|reports)/[\w./-]*)")
# Placeholders and patterns, not paths: <bundle>, {txt,json}, byod-*.json, runs/...
NOT_A_PATH = re.compile(r"[<>{}*]|\.\.\.")
PYTHON_MODULE = re.compile(r"python3? -m ([\w.]+)")


def documents() -> list[Path]:
    return [README, *sorted(PAGES.glob("*.md"))]


def document_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def relative_link_targets(text: str) -> list[str]:
    """Link targets that point into the repository: no scheme, no pure anchor; anchors and queries cut off."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0].split("?", 1)[0])
    return targets


def heading_anchors(text: str) -> set[str]:
    """The anchors MkDocs gives a page's headings (Python-Markdown's toc slugify; code fences skipped)."""
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.*?)\s*#*$", line)):
            anchors.add(slugify(re.sub(r"[`*]", "", heading.group(1)), "-"))
    return anchors


def repository_paths(text: str) -> set[str]:
    """Repository paths a document names, in prose, code spans or code blocks (trailing punctuation dropped)."""
    paths = set()
    for match in REPO_PATH.finditer(text):
        candidate = match.group(1).rstrip(".,:;")
        end = match.end(1)
        if NOT_A_PATH.search(candidate) or text[end : end + 1] in "<{*" and end < len(text):
            continue
        paths.add(candidate)
    return paths


def module_file(module: str) -> Path | None:
    """The source file of a module as `python -m` finds it from the repository root, without importing it."""
    parts = module.split(".")
    if parts[:2] == ["oodserve", "models"]:
        base, rest = REPO / "models", parts[2:]
    elif parts[0] == "oodserve":
        base, rest = REPO / "service", parts[1:]
    else:
        base, rest = REPO, parts
    target = base.joinpath(*rest)
    for candidate in (target.with_suffix(".py"), target / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/pages/ (at most {MAX_README_LINES})"


def test_readme_links_point_at_existing_files() -> None:
    targets = relative_link_targets(README.read_text())
    assert targets, "README.md links nothing: the parser found no link"
    missing = [target for target in targets if not (REPO / target).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_readme_anchors_into_the_docs_exist() -> None:
    """MkDocs checks the pages' own anchors; the README's links into them are checked here."""
    linked = [target for target in LINK.findall(README.read_text()) if "#" in target and target.startswith("docs/pages/")]
    broken = [target for target in linked if target.split("#", 1)[1] not in heading_anchors((REPO / target.split("#", 1)[0]).read_text())]
    assert not broken, f"README.md links to anchors the docs pages do not have: {broken}"


@pytest.mark.parametrize("document", documents(), ids=document_id)
def test_named_repository_paths_exist(document: Path) -> None:
    missing = sorted(path for path in repository_paths(document.read_text()) if not (REPO / path).exists())
    assert not missing, f"{document_id(document)} names paths that are not in the tree: {missing}"


@pytest.mark.parametrize("document", documents(), ids=document_id)
def test_python_m_modules_exist(document: Path) -> None:
    named = {name for name in PYTHON_MODULE.findall(document.read_text()) if not name.endswith(".")}  # `oodserve.bench.<tool>`
    modules = named - {"venv", "pip", "pytest", "json.tool"}
    missing = sorted(module for module in modules if module_file(module) is None)
    assert not missing, f"{document_id(document)} runs modules that are not in the tree: {missing}"


def test_every_setting_is_documented() -> None:
    page = (PAGES / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(OODSERVE_[A-Z0-9_]+)` \|", page, flags=re.MULTILINE))
    settings = {f"OODSERVE_{name.upper()}" for name in Settings.model_fields}
    assert not settings - documented, f"settings missing from docs/pages/configuration.md: {sorted(settings - documented)}"
    assert not documented - settings, f"docs/pages/configuration.md documents settings that do not exist: {sorted(documented - settings)}"


def exported_metric_families() -> set[str]:
    """Metric family names the service declares (counters without the `_total` the exposition adds)."""
    source = "\n".join(path.read_text() for path in (REPO / "service" / "observability").rglob("*.py"))
    return set(re.findall(r"\"(oodserve_[a-z0-9_]+)\"", source))


def test_every_metric_is_documented() -> None:
    page = (PAGES / "operations.md").read_text()
    families = exported_metric_families()
    assert families, "no metric names found under service/observability/"
    missing = sorted(name for name in families if not re.search(rf"`{name}(_total)?`", page))
    assert not missing, f"metrics missing from docs/pages/operations.md: {missing}"
    named = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in re.findall(r"`(oodserve_[a-z0-9_]+)", page)}
    unknown = sorted(named - families)
    assert not unknown, f"docs/pages/operations.md names metrics the service does not declare: {unknown}"


def test_parsers_find_what_they_should() -> None:
    text = (
        "See [a](docs/pages/api.md#errors), ![b](benchmarks/x.png \"t\"), [c](https://example.org), [d](#top); "
        "`service/engine.py`, (models/data.py). Not: /v1/models/x, oodserve.models.data, runs/models/x, "
        "`benchmarks/results/byod-*.json`, `models/bundles/<BUNDLE>`, `benchmarks/results/x-{a,b}.json`."
    )
    assert relative_link_targets(text) == ["docs/pages/api.md", "benchmarks/x.png"]
    assert repository_paths(text) == {"docs/pages/api.md", "benchmarks/x.png", "service/engine.py", "models/data.py"}
    assert module_file("oodserve.bench.load") == REPO / "service" / "bench" / "load.py"
    assert module_file("oodserve.models.data") == REPO / "models" / "data.py"
    assert module_file("oodserve.cli") == REPO / "service" / "cli" / "__main__.py"
    assert module_file("oodserve.nothing_here") is None
    page = "# Title\n\n## Your own model: `oodserve fit --backbone`\n\n```sh\n# not a heading\n```\n### Load and soak (2026-11-29)\n"
    assert heading_anchors(page) == {"title", "your-own-model-oodserve-fit-backbone", "load-and-soak-2026-11-29"}
