"""The docs do not drift from what they describe: docs/serving.md's API tables are `videochat_client.schema`'s
`markdown_table()`, docs/performance.md's block is what `bench/_report.py` renders from bench/results/, and every
relative link in README.md and docs/*.md points at a file (and heading) that exists."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from support.paths import ROOT
from videochat_client import schema

DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]


def block(text: str, name: str) -> str:
    """The text between `<!-- name:begin -->` and `<!-- name:end -->`, without the newlines next to them."""
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)\n?<!-- {name}:end -->", text, re.S)
    assert match, f"no <!-- {name}:begin --> ... <!-- {name}:end --> block"
    return match.group(1).strip("\n")


@pytest.mark.parametrize("name, fields", [("api-inputs", schema.INPUTS), ("api-outputs", schema.OUTPUTS)])
def test_serving_api_tables_are_the_schema(name, fields):
    expected = schema.markdown_table(fields)
    assert block((DOCS / "serving.md").read_text(), name) == expected, (
        f"docs/serving.md's {name} table differs from videochat_client.schema.markdown_table(); "
        f"put this between its markers:\n{expected}")


def test_observability_metrics_table_is_the_declaration():
    from videochat.serving import metrics
    expected = metrics.markdown_table()
    assert block((DOCS / "observability.md").read_text(), "metrics") == expected, (
        "docs/observability.md's metrics table differs from videochat.serving.metrics.markdown_table(); "
        f"put this between its markers:\n{expected}")


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performance_block_is_the_bench_report():
    report = load_report()
    assert block((DOCS / "performance.md").read_text(), "perf") == report.render(), (
        "docs/performance.md's perf block differs from bench/results/; run "
        "`python bench/_report.py --write docs/performance.md`")


def test_report_write_replaces_only_the_block(tmp_path):
    report = load_report()
    doc = tmp_path / "perf.md"
    doc.write_text(f"before\n{report.BEGIN}\nstale\n{report.END}\nafter\n")
    assert report.main(["--write", str(doc)]) == 0
    assert doc.read_text() == f"before\n{report.BEGIN}\n{report.render()}\n{report.END}\nafter\n"
    (tmp_path / "none.md").write_text("no markers\n")
    assert report.main(["--write", str(tmp_path / "none.md")]) == 2


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        base = slug(line.lstrip("#"))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)   # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)                          # nor inline code
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_docs_index_lists_every_docs_file():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in DOCS.glob("*.md") if f"(docs/{p.name})" not in readme]
    assert not missing, f"README.md's documentation table does not link {missing}"
