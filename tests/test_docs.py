"""The repository's documents cite only what the repository holds: no file names the developer
notes that live outside it, and every relative link of the README and of docs/ resolves, to an
existing file and, where it names one, to an existing heading."""

import itertools
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Not the repository's content: version control, the environment, caches, run outputs.
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "workdirs", "build"}
# Names of documents kept outside the repository by its developers; a citation of one of them
# must be a docs/ page instead. Spelled in pieces so that this file does not cite them itself.
OUTSIDE_NAMES = ("algorithms", "measures", "experiments", "stack")
OUTSIDE_MD = re.compile(r"([\w./-]*?)\b(" + "|".join(OUTSIDE_NAMES) + r")\.md\b")
OUTSIDE_DIR = re.compile(re.escape("..") + r"/shared\b|\bshared/" + "spec")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _text_files():
  """(relative path, text) of every UTF-8 file of the working tree outside SKIP_DIRS."""
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
    for name in files:
      path = pathlib.Path(folder, name)
      if name == ".git":   # a worktree's pointer to its repository
        continue
      try:
        yield path.relative_to(ROOT), path.read_text(encoding="utf-8")
      except (UnicodeDecodeError, OSError):
        continue   # binary (figures) or unreadable


def _line_of(text: str, index: int) -> int:
  return text.count("\n", 0, index) + 1


def test_no_citation_of_documents_outside_the_repository():
  bad = []
  for rel, text in _text_files():
    for match in OUTSIDE_MD.finditer(text):
      prefix, name = match.group(1), match.group(2)
      if prefix.endswith("docs/") and (ROOT / "docs" / f"{name}.md").exists():
        continue   # docs/NAME.md, a page that exists
      if not prefix and rel.parent == pathlib.Path("docs") and (DOCS / f"{name}.md").exists():
        continue   # a sibling page cited from inside docs/
      bad.append(f"{rel}:{_line_of(text, match.start())}: {match.group(0)}")
    for match in OUTSIDE_DIR.finditer(text):
      bad.append(f"{rel}:{_line_of(text, match.start())}: {match.group(0)}")
  assert not bad, "citations of files the repository does not hold:\n" + "\n".join(bad)


def _slug(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
  text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
  seen, out = {}, set()
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
    slug = _slug(heading)
    out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return out


MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
  bad = []
  for match in LINK.finditer(text):
    target = match.group(1)
    if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: {target}"
    if not resolved.exists():
      bad.append(f"{where} (no such file)")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      bad.append(f"{where} (no such heading)")
  assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_keep_their_columns(path):
  """Every row of every table has as many cells as its header: a '|' inside a cell, even inside
  a code span, must be escaped as '\\|' or it splits the cell."""
  text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
  bad = []
  for is_table, rows in itertools.groupby(text.splitlines(), lambda line: line.startswith("|")):
    if is_table:
      rows = list(rows)
      width = len(_cells(rows[0]))
      bad += [row for row in rows[1:] if len(_cells(row)) != width]
  assert not bad, f"{path.relative_to(ROOT)}: rows wider or narrower than their header:\n" + \
      "\n".join(bad)


def _cells(row: str) -> list:
  return re.split(r"(?<!\\)\|", row.strip())[1:-1]


def test_the_checks_can_fail():
  """The patterns catch what they are meant to, and let the good forms through."""
  outside = [f"see {name}.md §3" for name in OUTSIDE_NAMES] + [".." + "/shared/x"]
  assert all(OUTSIDE_MD.search(s) or OUTSIDE_DIR.search(s) for s in outside)
  good = OUTSIDE_MD.search("docs/methods.md, CSAM")
  assert good is None
  assert OUTSIDE_MD.search("docs/measures.md").group(1) == "docs/"
  links = [m.group(1) for m in LINK.finditer("[a](b.md#c) ![x](figures/y.png) [`z`](../Z.md)")]
  assert links == ["b.md#c", "figures/y.png", "../Z.md"]
  assert _slug("3. Sparse regression with a diagonal network (`configs/x.py`)") == \
      "3-sparse-regression-with-a-diagonal-network-configsxpy"
  assert _slug("The paper's small studies (measured)") == "the-papers-small-studies-measured"
  assert _cells("| a\\|b | `c|d` |") == [" a\\|b ", " `c", "d` "]
