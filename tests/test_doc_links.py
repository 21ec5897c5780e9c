"""Every relative link of the README and of docs/ reaches a file that exists and, where it names a
section (``page.md#section``), a heading of that page, slugged as GitHub slugs it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (code blocks skipped)."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"#+ (.*)", line)):
            found.add(slug(heading.group(1)))
    return found


def broken_links(page: Path) -> list[str]:
    """``page``'s relative links whose file or section does not exist, each with what is wrong."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, section = target.partition("#")
        dest = (page.parent / path).resolve() if path else page.resolve()
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif section and dest.suffix == ".md" and section not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_the_checker_finds_a_missing_file_and_a_missing_section(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## The default recipe: `train`\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#the-default-recipe-train) [b](other.md#not-a-heading) [c](gone.md) "
                    "[d](https://example.com/x.md) [e](#page)\n# Page\n")
    assert broken_links(page) == ["other.md#not-a-heading: no heading with that anchor", "gone.md: no such file"]


def test_every_link_of_the_readme_and_the_docs_reaches_its_file_and_section():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = {str(page.relative_to(ROOT)): links for page in pages if (links := broken_links(page))}
    assert not broken, broken
