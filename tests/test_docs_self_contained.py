"""The repository stands on its own: no tracked text file points at files outside it (a clone has no
developer notes folder beside it), and every relative markdown link in the README and docs/ resolves."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".py", ".md", ".ipynb", ".json", ".cfg", ".toml")
TEXT_NAMES = (".ci/run",)
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "shared/" + "specs", r"(?<![\w.-])" + "spec" + "s/",
                               "DESIGN" + r"\.md"]))
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def tracked_files(root: pathlib.Path) -> list[str]:
    """Paths tracked by git under `root` (skips the test outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked-file list")
    return [p for p in out.decode().split("\0") if p]


def outside_references(root: pathlib.Path, paths: list[str]) -> list[str]:
    """'path:line: text' for every line of the text files among `paths` that names a file outside the repo."""
    hits = []
    for rel in paths:
        if not (rel.endswith(TEXT_SUFFIXES) or rel in TEXT_NAMES):
            continue
        path = root / rel
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:160]}")
    return hits


def broken_links(root: pathlib.Path, markdown: pathlib.Path) -> list[str]:
    """Relative link targets in `markdown` that do not exist inside `root` (URLs and #anchors skipped)."""
    bad = []
    text = markdown.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if SCHEME.match(target) or target.startswith("#"):
            continue
        resolved = (markdown.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
            bad.append(f"{markdown.relative_to(root)}: ({target})")
    return bad


def test_no_tracked_text_file_points_outside_the_repository():
    hits = outside_references(ROOT, tracked_files(ROOT))
    assert not hits, "references to files that a clone does not have:\n" + "\n".join(hits)


def test_relative_markdown_links_resolve_inside_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert (ROOT / "docs" / "architecture.md") in docs
    bad = [b for md in docs for b in broken_links(ROOT, md)]
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_are_meant_to(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("x")
    bad_py = "# see " + "../" + "shared/notes.md\n"
    (tmp_path / "a.py").write_text("ok = 1\n" + bad_py)
    (tmp_path / "b.md").write_text("read " + "DESIGN" + ".md first\n")
    (tmp_path / "c.toml").write_text("in_specs = 1  # out_specs/ is fine too\n")
    (tmp_path / "d.txt").write_text("../" + "shared is not checked in a .txt\n")
    hits = outside_references(tmp_path, ["a.py", "b.md", "c.toml", "d.txt"])
    assert [h.split(":")[0] for h in hits] == ["a.py", "b.md"]
    assert hits[0].startswith("a.py:2:")

    readme = tmp_path / "README.md"
    readme.write_text("[ok](docs/here.md) [anchor](#x) [web](https://example.org/a.md) ![img](docs/here.md#top)\n"
                      "[missing](docs/gone.md) [escape](../elsewhere/README.md) [dir](docs)\n")
    bad = broken_links(tmp_path, readme)
    assert bad == ["README.md: (docs/gone.md)", "README.md: (../elsewhere/README.md)"]
