"""README.md and the docs: the README stays a short front page, every relative link (README.md,
docs/*.md, CHANGELOG.md) reaches a file of this repository and, with `#anchor`, one of its headings
(GitHub's slugs), and every `python X.py` / `python -m X` command in the README's shell blocks
(and inline code) whose script is in the repository accepts its flags: `--help` is appended to the script and its
subcommand, and each `--flag` the README passes must appear in that help. Commands are never run
beyond `--help`; `make`, `ray` and pytest itself are not run (the Python entrypoint of a
`ray job submit ... -- python ...` line is checked like any other). Fast: the help commands run in
parallel, once per session."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED_PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
MAX_README_LINES = 150
HELP_TIMEOUT = 60
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def split_markdown(path: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the lines outside fenced code blocks, [(language, lines) of each fenced block])."""
    prose, blocks, block = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line)
        if block is None and fence:
            block = (line.strip()[3:].strip().split(" ")[0].lower(), [])
        elif block is not None and fence:
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    return prose, blocks


def slug(text: str) -> str:
    """GitHub's heading anchor: the rendered text, lower-cased, without punctuation but `-` and `_`,
    spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|__|\*)", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """The anchors of every heading outside code blocks; repeated ones get -1, -2, … as on GitHub."""
    seen, found = Counter(), set()
    for line in split_markdown(path)[0]:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return frozenset(found)


def links(path: Path) -> list[str]:
    targets = []
    for line in split_markdown(path)[0]:
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def relative_links() -> list[tuple[Path, str]]:
    return [(page, target) for page in LINKED_PAGES if page.exists() for target in links(page)
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)]  # http:, https:, mailto: are not files


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_the_pages_the_readme_promises_exist():
    for page in LINKED_PAGES[1:]:
        assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert (ROOT / "LICENSE").is_file()


@pytest.mark.parametrize("page,target", relative_links(),
                         ids=[f"{page.relative_to(ROOT)}->{target}" for page, target in relative_links()])
def test_relative_link_resolves(page: Path, target: str):
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    assert destination == ROOT or ROOT in destination.parents, \
        f"{page.relative_to(ROOT)}: {target} points outside the repository"
    assert destination.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
    if anchor:
        assert destination.suffix == ".md", f"{page.relative_to(ROOT)}: {target}: anchor into a non-Markdown file"
        assert anchor in anchors(destination), \
            f"{page.relative_to(ROOT)}: {target}: no heading with anchor #{anchor} in {file_part or page.name}"


def test_no_paths_outside_the_repository_or_issue_numbers_in_readme():
    text = README.read_text(encoding="utf-8")
    assert "../shared" not in text and "/work/shared" not in text
    issue = re.search(r"\bissues?\s+#?\d+|(?<![\w&/#])#\d+\b", text, flags=re.IGNORECASE)
    assert issue is None, f"README.md mentions an issue number: {issue.group(0)!r}"
    for page in LINKED_PAGES[1:]:
        assert "../shared" not in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)} links ../shared"


# --- commands ------------------------------------------------------------------------------------

def shell_lines(path: Path) -> list[str]:
    """The README's shell lines, continuations joined."""
    lines = []
    for language, block in split_markdown(path)[1]:
        if language not in SHELL_LANGUAGES:
            continue
        pending = ""
        for line in block:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
    return lines


def inline_commands(path: Path) -> list[str]:
    """Commands written as inline code in the prose (a table's `python benchmarks/... --only X`)."""
    spans = [match.group(0).strip("`") for line in split_markdown(path)[0] for match in INLINE_CODE.finditer(line)]
    return [span for span in spans if re.match(r"^(\S*/)?python3? ", span)]


def simple_commands(line: str) -> list[list[str]]:
    """The line's simple commands (split at `&&`, `||`, `;`, `|`), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token and set(token) <= set("&|;"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [command for command in commands + [current] if command]


def python_invocation(command: list[str]) -> tuple[list[str], list[str]] | None:
    """(the target: [script.py] or ["-m", module], the arguments after it) of a python call in the
    command, e.g. the entrypoint after `ray job submit ... --`; None without one."""
    if command[0] == "make":
        return None
    for i, token in enumerate(command):
        if token in ("python", "python3") or token.endswith(("/python", "/python3")):
            rest = command[i + 1:]
            if len(rest) >= 2 and rest[0] == "-m":
                return rest[:2], rest[2:]
            if rest and rest[0].endswith(".py"):
                return rest[:1], rest[1:]
            return None
    return None


def script_path(target: list[str]) -> Path:
    if target[0] == "-m":
        module = ROOT.joinpath(*target[1].split("."))
        return module / "__main__.py" if module.is_dir() else module.with_suffix(".py")
    return ROOT / target[0]


def readme_commands() -> list[tuple[str, list[str], list[str]]]:
    """(the README line, the help command's arguments after python, the flags the line passes)."""
    found = []
    for line in shell_lines(README) + inline_commands(README):
        for command in simple_commands(line):
            invocation = python_invocation(command)
            if invocation is None:
                continue
            target, args = invocation
            if target == ["-m", "pytest"]:
                continue  # this test itself
            subcommand = args[:1] if args and re.fullmatch(r"[A-Za-z][\w-]*", args[0]) else []
            flags = sorted({arg.split("=", 1)[0] for arg in args if arg.startswith("--")})
            found.append((line.split("#")[0].strip(), [*target, *subcommand, "--help"], flags))
    return found


COMMANDS = readme_commands()


@lru_cache(maxsize=1)
def help_outputs() -> dict[tuple[str, ...], tuple[int, str]]:
    """Every distinct help command, all started at once (each imports torch or DALI: seconds)."""
    runnable = {tuple(help_args) for _, help_args, _ in COMMANDS
                if script_path([help_args[0]] if help_args[0] != "-m" else help_args[:2]).is_file()}
    started = {args: subprocess.Popen([PYTHON, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for args in sorted(runnable)}
    results = {}
    for args, process in started.items():
        try:
            output, _ = process.communicate(timeout=HELP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output = process.communicate()[0] + f"\n(timed out after {HELP_TIMEOUT} s)"
        results[args] = (process.returncode, output)
    return results


def test_readme_shows_python_commands():
    assert len(COMMANDS) >= 5, "the README's shell blocks lost their python commands (or the parser broke)"


@pytest.mark.parametrize("line,help_args,flags", COMMANDS, ids=[" ".join(c[1][:-1]) + f" [{i}]"
                                                                for i, c in enumerate(COMMANDS)])
def test_readme_command_accepts_its_flags(line: str, help_args: list[str], flags: list[str]):
    target = help_args[:2] if help_args[0] == "-m" else help_args[:1]
    if not script_path(target).is_file():
        pytest.skip(f"{' '.join(target)} is not a script of this repository")
    code, output = help_outputs()[tuple(help_args)]
    assert code == 0, f"`python {' '.join(help_args)}` exited {code} for README line `{line}`:\n{output[-2000:]}"
    missing = [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", output)]
    assert not missing, f"README line `{line}`: {', '.join(missing)} not in `python {' '.join(help_args)}`"
