"""The repository stands on its own: no tracked file points outside it, and every relative link in
the Markdown documentation (README.md, docs/*.md) reaches a file that exists.

The documents are docs/spec.md, docs/routing.md, docs/gpu.md and docs/environment.md. The
forbidden strings are assembled from pieces, so that this file does not match its own patterns.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Their upper-case names outside docs/ are gone.
_DOC_NAMES = ("SPEC", "ROUTING", "GPU", "ENVIRONMENT")
OUTSIDE = [
    ("a sibling directory of the checkout", re.compile(re.escape(".." + "/" + "shared"))),
    ("an absolute workspace path", re.compile(re.escape("/" + "work" + "/"))),
    (
        "a document not in the repository (the docs are docs/spec.md, routing.md, gpu.md, "
        "environment.md)",
        re.compile(r"\b(?:" + "|".join(_DOC_NAMES) + r")\." + "md" + r"\b"),
    ),
]


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (e.g. a copy made for a GPU machine): no tracked files")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def is_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def test_no_tracked_file_mentions_a_path_outside_the_repository():
    hits = []
    files = tracked_files()
    assert any(p.name == "README.md" for p in files)  # the listing is real, not empty
    for path in files:
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if is_binary(data):
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            found = [what for what, pattern in OUTSIDE if pattern.search(line)]
            if found:
                rel = path.relative_to(ROOT)
                hits.append(f"{rel}:{number}: {'; '.join(found)}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_must_and_spare_the_docs():
    def flagged(text):
        return [what for what, pattern in OUTSIDE if pattern.search(text)]

    sibling = ".." + "/shared"
    assert flagged(f"see {sibling}/notes.txt")
    assert flagged("written to " + "/work" + "/main/runs")
    for name in _DOC_NAMES:
        assert flagged(f"as {name}.md says"), name
        assert flagged(f"({sibling}/{name}.md)"), name
    assert not flagged("docs/spec.md, docs/routing.md and docs/gpu.md")
    assert not flagged("[the spec](spec.md), Section 8; bench/results/gpu/")


# Markdown links: [text](target) and ![alt](target), and reference definitions `[x]: target`.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    return [ROOT / "README.md", ROOT / "bench" / "results" / "README.md", *docs]


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in the repository (no URL, no pure #anchor), code removed."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [
        t
        for t in targets
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)  # http:, https:, mailto:, ...
        and not t.startswith("#")
    ]


def test_the_documents_exist():
    for name in ("spec.md", "routing.md", "gpu.md", "environment.md", "faults.md", "deploy.md"):
        assert (ROOT / "docs" / name).is_file(), name


def test_relative_markdown_links_point_at_files_that_exist():
    broken = []
    for md in markdown_files():
        for target in relative_links(md.read_text()):
            path = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (md.parent / path).resolve()
            inside = resolved == ROOT or ROOT in resolved.parents
            if not inside or not resolved.exists():
                why = "leaves the repository" if not inside else "does not exist"
                broken.append(f"{md.relative_to(ROOT)}: ({target}) {why}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_extraction_finds_links_and_skips_code():
    text = (
        'See [spec](spec.md#4-routing), ![chart](../bench/x.png "title") and [web](https://a.b).\n'
        "[ref]: routing.md\n"
        "`[not](a-link.md)` and\n```\n[nor](this.md)\n```\n[top](#results)\n"
    )
    assert sorted(relative_links(text)) == ["../bench/x.png", "routing.md", "spec.md#4-routing"]


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## Project layout\n+```\n(.*?)```", readme, re.S).group(1)


def test_the_readme_layout_matches_the_tree():
    """Every module of capsfast/ and kernels/, every launcher and every bench script is named in
    README's layout, and every file the layout names exists."""
    block = layout_block()
    named = set(re.findall(r"\b([a-z_]+\.py)\b", block))
    wanted = {p for d in ("capsfast", "kernels") for p in (ROOT / d).glob("*.py")}
    wanted |= {p for d in ("launch", "bench") for p in (ROOT / d).glob("*.py")}
    skip = {"__init__.py", "conftest.py"}  # package and test plumbing
    skip |= {"common.py"} if "common.py" in named else set()  # kernels/ and bench/ share the name
    missing = sorted(
        str(p.relative_to(ROOT))
        for p in wanted
        if p.name not in skip and not p.name.startswith(("_", "test_")) and p.name not in named
    )
    assert not missing, f"modules the README's layout does not name: {missing}"
    dirs = ("capsfast", "kernels", "launch", "bench")
    gone = sorted(n for n in named if not any((ROOT / d / n).exists() for d in dirs))
    assert not gone, f"the README's layout names files that do not exist: {gone}"


def test_every_capsfast_variable_is_documented():
    """docs/environment.md lists every CAPSFAST_* variable a tracked file reads or names."""
    documented = set(
        re.findall(r"CAPSFAST_[A-Z_]*[A-Z]", (ROOT / "docs" / "environment.md").read_text())
    )
    used = set()
    for path in tracked_files():
        if path.is_file() and "results" not in path.parts and path.suffix in (".py", "", ".sh"):
            data = path.read_bytes()
            if not is_binary(data):
                used |= set(re.findall(r"CAPSFAST_[A-Z_]*[A-Z]", data.decode("utf-8", "replace")))
    assert used, "the search found nothing: it is broken"
    assert not used - documented, f"not in docs/environment.md: {sorted(used - documented)}"


def test_no_function_in_capsfast_is_over_80_lines_and_the_trainer_reads_in_one_sitting():
    import ast

    long = []
    for path in sorted((ROOT / "capsfast").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert not long, f"functions over 80 lines: {long}"
    lines = len((ROOT / "capsfast" / "train.py").read_text().splitlines())
    assert lines < 500, f"capsfast/train.py has {lines} lines"
