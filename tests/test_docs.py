"""The docs stay true: every relative link in README.md and docs/*.md resolves (a file or folder, and for `#anchor`
a heading with that GitHub slug), and every `python -m X` / `python path.py` they show (`deepspeed` and `torchrun`
count as python) names a module or file whose `--help` exits 0.

Links that leave the repository (`../shared/...`) are checked only where that folder exists, as the tests that
read `../shared/data` skip without it. The `--help` runs go in parallel, offline, with this interpreter.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = {"python", "python3", "deepspeed", "torchrun"}
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK_TARGET = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")  # the target of [text](target); text may nest [ ]
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def _split(page: Path) -> tuple[str, list[str]]:
    """(the page's prose, its code: each fenced block's lines joined, then each inline code span)."""
    prose, code, block, fenced = [], [], [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            if fenced:
                code.append("\n".join(block))
                block = []
            fenced = not fenced
        elif fenced:
            block.append(line)
        else:
            prose.append(line)
    text = "\n".join(prose)
    code += INLINE_CODE.findall(text)
    return text, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return frozenset(out)


def links(page: Path) -> list[str]:
    prose, _ = _split(page)
    return [t for t in LINK_TARGET.findall(INLINE_CODE.sub("", prose)) if not SCHEME.match(t)]


def commands(page: Path) -> list[tuple[str, str]]:
    """("-m", module) or ("file", path) for each python / deepspeed / torchrun command the page shows."""
    found = []
    for code in _split(page)[1]:
        for line in code.replace("\\\n", " ").splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                tokens = line.split()
            for i, token in enumerate(tokens):
                launcher = token.rsplit("/", 1)[-1]
                if launcher not in LAUNCHERS:
                    continue
                rest = tokens[i + 1:]
                for j, arg in enumerate(rest):
                    if arg == "-m" and j + 1 < len(rest):
                        found.append(("-m", rest[j + 1]))
                        break
                    if arg.endswith(".py"):
                        found.append(("file", arg))
                        break
                    if arg == "-c" or (launcher.startswith("python") and not arg.startswith("-")):
                        break
    return found


def _all_commands() -> list[tuple[str, str]]:
    return sorted({c for page in PAGES for c in commands(page)})


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1, "README.md and docs/*.md"


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The page's relative links that name no file, or no heading for their #anchor. Paths are normalized as
    written, never resolved: `../shared` may be a symlink to anywhere, and resolving it would leave the tree."""
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        path = Path(os.path.normpath(page.parent / path_part)) if path_part else page
        if not path.is_relative_to(root):  # outside the repository: checked where that folder exists (../shared)
            outside = path.relative_to(root.parent).parts if path.is_relative_to(root.parent) else ()
            if not outside or not (root.parent / outside[0]).exists():
                continue
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"{target}: no heading with slug #{anchor} in {path.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_into_a_symlinked_shared_folder_are_checked(tmp_path):
    """`../shared` as a symlink to a folder elsewhere (a user's setup): its links are checked, not an error."""
    (tmp_path / "elsewhere" / "shared").mkdir(parents=True)
    (tmp_path / "elsewhere" / "shared" / "DUPMAE.md").write_text("# Formulas\n")
    repo = tmp_path / "work" / "repo"
    repo.mkdir(parents=True)
    (tmp_path / "work" / "shared").symlink_to(tmp_path / "elsewhere" / "shared", target_is_directory=True)
    page = repo / "README.md"
    page.write_text("[a](../shared/DUPMAE.md#formulas) [b](../shared/missing.md) [c](../absent/x.md) [d](#top)\n")
    assert broken_links(page, repo) == ["../shared/missing.md: no such file", "#top: no heading with slug #top in "
                                        "README.md"]


@pytest.fixture(scope="module")
def help_runs() -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """`--help` of every command the pages show, in parallel."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def run(command: tuple[str, str]) -> subprocess.CompletedProcess:
        kind, name = command
        argv = [sys.executable, "-m", name] if kind == "-m" else [sys.executable, name]
        return subprocess.run(argv + ["--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    todo = _all_commands()
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(todo, pool.map(run, todo)))


@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: c[1])
def test_shown_command_has_help(command, help_runs):
    kind, name = command
    if kind == "file":
        assert (ROOT / name).is_file(), f"python {name}: no such file"
    elif (ROOT / name.split(".")[0]).is_dir():
        module = ROOT / name.replace(".", "/")
        assert module.with_suffix(".py").is_file() or (module / "__main__.py").is_file(), f"-m {name}: no such module"
    code, stderr = help_runs[command].returncode, help_runs[command].stderr
    assert code == 0, f"{' '.join(command)} --help exited {code}:\n{stderr[-2000:]}"
