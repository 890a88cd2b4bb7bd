"""The README and docs/*.md stay short, true to the repository and well-formed (CPU only).

Each checker is a plain function over markdown text, and each is also run on a small bad sample, so a
checker that could never fail is caught here too.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README] + DOCS
README_MAX_LINES = 250

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked out: links and tables
    are only read where markdown renders them."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", "``", line)))
    return out


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def repeated_headers(text: str) -> list[str]:
    """Every table row (or second separator) that repeats its table's header: such a row renders as a
    data row that reads like a header."""
    problems, table = [], []
    for n, line in prose_lines(text) + [(0, "")]:
        if line.strip().startswith("|"):
            table.append((n, line.strip()))
            continue
        if len(table) >= 2 and SEPARATOR.match(table[1][1]):
            header = cells(table[0][1])
            for m, row in table[2:]:
                if cells(row) == header:
                    problems.append(f"line {m}: the header row again: {row}")
                elif SEPARATOR.match(row):
                    problems.append(f"line {m}: a second separator row")
        table = []
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return s.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for _, line in prose_lines(path.read_text()) if re.match(r"#{1,6} ", line)}


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links (and their #anchors) that name no file (or no heading) of the repository."""
    problems = []
    for n, line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"line {n}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"line {n}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def spec_mentions(text: str) -> list[str]:
    """Mentions of the spec file other than docs/spec.md (the copy in this repository)."""
    return [f"line {n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            for m in re.finditer(r"spec\.md", line, re.I) if line[max(0, m.start() - 5):m.start()] != "docs/"]


# --- the repository's files --------------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_table_repeats_its_header(path):
    assert repeated_headers(path.read_text()) == []


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path, path.read_text()) == []


def test_readme_cites_the_spec_only_as_docs_spec_md():
    text = README.read_text()
    assert spec_mentions(text) == []
    assert "](docs/spec.md)" in text  # and it does link the copy
    assert (ROOT / "docs/spec.md").read_text().startswith("# cute_gdn: the contract")


def test_readme_api_block_is_there_for_the_gpu_test():
    # tests/test_readme_gpu.py runs this block on a GPU; here it must at least be found and parse.
    block = re.search(r"## API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    compile(block.group(1), "README.md", "exec")
    assert "kernels.warmup()" in block.group(1)


def test_readme_engine_sections_in_order():
    text = README.read_text()
    heads = ["## Set-up", "## The main job", "## API", "## Engines", "### SGLang",
             "### Hugging Face transformers (Qwen3-Next)", "### torch.compile", "## Conventions", "## Results",
             "## Limitations", "## Layout"]
    where = [text.find("\n" + h) for h in heads]
    assert -1 not in where, [h for h, w in zip(heads, where) if w == -1]
    assert where == sorted(where)


# --- the table generator ------------------------------------------------------------------------------


def load_plot():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench/plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # matplotlib is imported only to draw PNGs
    return mod


@pytest.mark.parametrize("name", ["decode_H200", "decode_sequential_H200", "verify_H200", "prefill_graph_H200",
                                  "prefill_H200", "prefill_graph_H100_80GB_HBM3", "prefill_stage1_H200"])
def test_generated_tables_have_one_header(name):
    plot = load_plot()
    data = json.loads((ROOT / f"bench/results/{name}.json").read_text())
    ops = {r["op"] for r in data["rows"]}
    fn = plot.prefill_table if "prefill" in ops else plot.verify_table if "verify" in ops else plot.decode_table
    text = fn(data) + "\n\n" + plot.summary_table(data)
    assert repeated_headers(text) == []
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))]
    # Every table (the full ones and the README's short one) has one separator, right under its header.
    assert len(starts) >= 2
    assert [i + 1 for i in starts] == [i for i, ln in enumerate(lines) if SEPARATOR.match(ln)]


def test_generator_refuses_a_repeated_header():
    plot = load_plot()
    with pytest.raises(ValueError, match="repeats the header"):
        plot.md_table(["B", "us"], [["1", "2.0"], ["B", "us"]])
    assert plot.md_table(["B", "us"], [["1", "2.0"]]) == ["| B | us |", "|---|---|", "| 1 | 2.0 |"]


# --- the checkers fail where they should --------------------------------------------------------------


def test_checkers_catch_bad_samples(tmp_path):
    doubled = "| B | us |\n|---|---|\n| B | us |\n|---|---|\n| 1 | 2.0 |\n"
    assert len(repeated_headers(doubled)) == 2  # the header again, and a second separator
    assert repeated_headers("| B | us |\n|---|---|\n| 1 | 2.0 |\n") == []
    assert repeated_headers("```\n| B | us |\n|---|---|\n| B | us |\n```\n") == []  # code, not a table

    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    bad = "[x](missing.md) [y](there.md#nowhere) [ok](there.md#a-heading) [web](https://example.com) `[c](no.md)`"
    problems = broken_links(page, bad)
    assert len(problems) == 2 and "missing.md" in problems[0] and "#nowhere" in problems[1]

    assert spec_mentions("the contract: SPEC.md") and spec_mentions("see ../shared/SPEC.md")
    assert spec_mentions("see [the spec](docs/spec.md)") == []
