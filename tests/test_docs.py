"""The README is a short front page and the docs/ pages stay readable and linked (issue 23, goal 1).

Plain text checks, no JAX: README.md <= 10,000 bytes with `make demo` and `make test` in its first 30 lines;
no prose paragraph over 8 lines in README.md or docs/*.md; every relative markdown link resolves to a file
and, for `#anchor`, to a heading of that file (GitHub's slugs).
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

MAX_README_BYTES = 10_000
MAX_PARAGRAPH_LINES = 8

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s+")
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str):
    """(line number, line) of every line outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def paragraphs(text: str):
    """(first line number, line count) of each paragraph: consecutive non-blank lines outside fenced code,
    table rows and headings apart; a list item starts a new paragraph, so each item counts on its own."""
    found, start, count = [], None, 0

    def close():
        if count:
            found.append((start, count))

    for number, line in prose_lines(text):
        if not line.strip() or line.lstrip().startswith("|") or HEADING.match(line):
            close()
            start, count = None, 0
            continue
        if LIST_ITEM.match(line):
            close()
            start, count = None, 0
        if start is None:
            start = number
        count += 1
    close()
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def links(text: str):
    """(line number, target) of every markdown link outside code."""
    for number, line in prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            yield number, match.group(1)


def test_readme_is_a_short_front_page():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes (limit {MAX_README_BYTES}); move text to docs/"
    head = "\n".join(README.read_text().splitlines()[:30])
    assert "make demo" in head and "make test" in head, "`make demo` and `make test` belong in the first 30 lines"


def test_docs_pages_exist_and_are_linked_from_the_readme():
    assert DOCS, "docs/ holds no pages"
    readme_targets = {target.split("#")[0] for _, target in links(README.read_text())}
    unlinked = [page.name for page in DOCS if f"docs/{page.name}" not in readme_targets]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_no_paragraph_is_over_eight_lines():
    long = [f"{page.relative_to(ROOT)}:{start} ({count} lines)"
            for page in PAGES for start, count in paragraphs(page.read_text()) if count > MAX_PARAGRAPH_LINES]
    assert not long, f"paragraphs over {MAX_PARAGRAPH_LINES} lines: {long}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for number, target in links(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{number} -> {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                broken.append(f"{where} (no such heading)")
        for number, line in prose_lines(page.read_text()):
            line = INLINE_CODE.sub("", line)
            if line.count("](") != len(LINK.findall(line)):  # a link split over two lines escapes the check above
                broken.append(f"{page.relative_to(ROOT)}:{number} (a link split over lines: keep it on one)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checks_themselves_catch_what_they_should():
    text = "# T\n\n" + "a\n" * 9 + "\n```\n" + "code\n" * 20 + "```\n| t |\n| - |\n- item\n- item\n"
    assert [count for _, count in paragraphs(text)] == [9, 1, 1]
    assert slug("Measured on one NVIDIA H100 (2026-11-27)") == "measured-on-one-nvidia-h100-2026-11-27"
    assert slug("`ComputeConfig`: the one switch") == "computeconfig-the-one-switch"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
    assert list(links("see [x](docs/a.md#b) and `[y](not/a/link)`\n```\n[z](c.md)\n```\n")) == [(1, "docs/a.md#b")]
