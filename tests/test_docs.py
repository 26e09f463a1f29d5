"""The docs cannot rot: the site builds strictly, every relative link and anchor resolves, every
command block runs against a real server (or says why it cannot), and the `REFT_*` options the
docs name are exactly the server's.

How a block is marked, in README.md and docs/**/*.md: a fence whose info string is a command
language (bash, sh, shell, console, python, py) must follow, on the line before it, either
`<!-- test: run -->` (this test runs it) or `<!-- test: skip: REASON -->` (it cannot run here,
and REASON says why). Other fences declare what they are (`text`, `json`, ...). A run block may
name the server as `localhost:8000` or `127.0.0.1:8000` and scratch files under `/tmp/`; both are
rewritten to the test's server and a temporary directory. Bash blocks run with `set -euo pipefail`
and this environment's `reft-serve` first on PATH; python blocks with this interpreter. A block
fails if it exits non-zero or prints the API's error shape.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import Settings

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
# A `text` fence is not run, so it must not hold what reads as a command.
COMMAND_WORDS = ("curl ", "make ", "reft-serve ", "docker ", "kubectl ", "helm ", "python ", "pip ", "lm_eval ")
MARK = re.compile(r"^<!--\s*test:\s*(?P<kind>run|skip)\s*(?::\s*(?P<reason>.*?))?\s*-->$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>```+|~~~+)\s*(?P<info>[^\s`]*)")
SNIPPET = re.compile(r'^--8<--\s+"(?P<path>[^"]+)"\s*$', re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target><[^>]+>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFT_NAME = re.compile(r"\bREFT_[A-Z0-9_]*[A-Z0-9]\b")
SERVER = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the fence's line, 1-based
    lang: str
    code: str
    kind: str | None  # "run", "skip" or None (unmarked)
    reason: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def text_of(path: Path) -> str:
    """A page's markdown with `--8<-- "file"` snippet lines replaced by the file they include."""
    return SNIPPET.sub(lambda m: (REPO / m["path"]).read_text(), path.read_text())


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a page, with the test mark on the line before it."""
    out: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        close = re.compile(r"^ {0,3}" + re.escape(opening["ticks"][0]) + "{" + str(len(opening["ticks"])) + r",}\s*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), len(lines))
        previous = lines[i - 1].strip() if i else ""
        mark = MARK.match(previous)
        out.append(Block(path, i + 1, opening["info"].lower(), "\n".join(lines[i + 1:end]) + "\n",
                         mark["kind"] if mark else None, (mark["reason"] or "").strip() if mark else ""))
        i = end + 1
    return out


def prose(markdown: str, inline_code: bool = False) -> str:
    """The markdown without fenced blocks (and inline code unless asked), where links are not links."""
    kept, fence = [], None
    for line in markdown.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening["ticks"][0] * len(opening["ticks"])
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line if inline_code else re.sub(r"`+[^`]*`+", "", line))
    return "\n".join(kept)


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs uses) of a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>|[`*]", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    markdown = text_of(path)
    headings = [m[1] for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", prose(markdown, inline_code=True), re.M)]
    return {slug(h) for h in headings} | set(re.findall(r'\bid="([^"]+)"', markdown))


ALL_BLOCKS = [b for page in DOCS for b in blocks(page)]
RUN_BLOCKS = [b for b in ALL_BLOCKS if b.kind == "run"]


def test_pages_found():
    """The pages this module checks exist, and some of their blocks run (a test that cannot fail is none)."""
    assert (REPO / "docs" / "index.md") in DOCS and len(DOCS) > 20
    assert len(RUN_BLOCKS) >= 10, [b.where for b in RUN_BLOCKS]


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, anchor, snippet or nav entry fails the build."""
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: `make install` (or `pip install -e '.[docs]'`) installs it")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in DOCS[1:]:  # docs/a/b.md is built as site/a/b/index.html, docs/index.md as site/index.html
        relative = page.relative_to(REPO / "docs").with_suffix("")
        folder = relative.parent if relative.name == "index" else relative
        assert (tmp_path / "site" / folder / "index.html").is_file(), f"{page} was not built"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(page):
    """Every relative link and image of a page names a file that exists, and an anchor a heading of it."""
    broken = []
    for match in LINK.finditer(prose(text_of(page))):
        target = match["target"].strip("<>")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, broken


def test_every_command_block_is_marked():
    """Each command block is run or excused with a reason; other fences say what they hold."""
    problems = []
    for b in ALL_BLOCKS:
        if not b.lang:
            problems.append(f"{b.where}: a fence without an info string (`bash`, `python`, `text`, ...)")
        elif b.lang in COMMAND_LANGS:
            if b.kind is None:
                problems.append(f"{b.where}: a {b.lang} block marked neither <!-- test: run --> nor "
                                "<!-- test: skip: REASON -->")
            elif b.kind == "skip" and len(b.reason) < 10:
                problems.append(f"{b.where}: skipped without a reason")
        else:
            if b.kind is not None:
                problems.append(f"{b.where}: a test mark on a {b.lang} block, which is never run")
            problems += [f"{b.where}: a {b.lang} block holds a command: {line!r}" for line in b.code.splitlines()
                         if line.removeprefix("$ ").startswith(COMMAND_WORDS)]
    for page in DOCS:
        lines = page.read_text().splitlines()
        problems += [f"{page.relative_to(REPO)}:{n}: a test mark not followed by a fence"
                     for n, line in enumerate(lines, 1)
                     if MARK.match(line.strip()) and not (n < len(lines) and FENCE.match(lines[n]))]
    assert not problems, "\n".join(problems)


def options_read_from_environment() -> set[str]:
    """`REFT_*` names the server reads directly, beside the `Settings` fields (e.g. REFT_CACHE_DIR)."""
    names = set()
    for source in (REPO / "server").rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](REFT_[A-Z0-9_]+)[\"']", source.read_text()))
    return names


def test_options_match_the_server():
    """Every documented REFT_* name is an option the server reads, and every option is on the options page."""
    fields = {"REFT_" + name.upper() for name in Settings.model_fields}
    known = fields | options_read_from_environment()
    assert "REFT_CACHE_DIR" in known
    unknown = {f"{page.relative_to(REPO)}: {name}" for page in DOCS for name in REFT_NAME.findall(page.read_text())
               if name not in known}
    assert not unknown, sorted(unknown)
    options_page = (REPO / "docs" / "using" / "options.md").read_text()
    undocumented = sorted(name for name in known if f"`{name}`" not in options_page)
    assert not undocumented, f"options missing from docs/using/options.md: {undocumented}"


# ---- running the blocks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory, reft_server_factory):
    """The server the docs talk to: the example adapters of adapters/, as `make serve` would load them."""
    root = tmp_path_factory.mktemp("docs")
    registry = root / "adapters"
    registry.mkdir()
    for adapter in (REPO / "adapters").glob("*.safetensors"):
        shutil.copy(adapter, registry / adapter.name)
    server = reft_server_factory(registry, root / "server.log", {"REFT_MAX_NEW_TOKENS": "256"})
    yield server
    server.stop()


@pytest.mark.slow  # a server start, model loads and generations: minutes on a shared 2-core CPU
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.where)
def test_block_runs(block, request, tmp_path):
    code = block.code.replace("/tmp/", f"{tmp_path}/")
    if SERVER.search(code):
        server = request.getfixturevalue("docs_server")
        code = SERVER.sub(f"127.0.0.1:{server.port}", code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFT_") or k == "REFT_CACHE_DIR"}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "REFT_DEVICE": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    if block.lang in {"python", "py"}:
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-c", "set -euo pipefail\n" + code]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{block.where} exited {result.returncode}:\n{code}\n{output[-4000:]}"
    assert '"error": {' not in result.stdout and '"error":{' not in result.stdout, f"{block.where}:\n{output[-4000:]}"
