"""The documentation cannot drift from the code: every `sakimi-next` command line in README.md and docs/
parses with the current flags of its mode, every script flag a doc uses exists, every path an example
reads is one a documented command (or a make target) writes, and every relative link, image and file path exists.

Command lines are taken from fenced code blocks (continued lines joined, comments, pipes and redirections
cut off) and from inline code spans; they are parsed with the parser `--mode X` builds, never run."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from sakimi_next.cli import build_parser
from sakimi_next.commands import MODES

from .helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# what names the program in a command line: sakimi-next (any path to it), python -m sakimi_next,
# torchrun ... -m sakimi_next
PROGRAM = re.compile(r"(^|/)sakimi-next$")


@dataclass(frozen=True)
class Command:
    where: str  # file:line, for the test id and the failure message
    argv: tuple[str, ...]  # after the program name


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(text: str):
    """(line number, line) of each line inside fenced code blocks, continued lines joined."""
    in_block, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def inline_spans(text: str):
    """(line number, content) of each inline code span outside fenced blocks; a span may wrap onto the
    next line of its paragraph."""
    lines, in_block = [], False
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        in_block ^= fence
        lines.append("" if in_block or fence else line)
    prose = "\n".join(lines)
    for m in re.finditer(r"`((?:[^`\n]|\n(?!\s*\n))+)`", prose):
        yield prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


def shell_words(line: str) -> list[str]:
    """The words of a shell line, comments dropped; operators (|, >, &&, ...) as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def segments(words: list[str]):
    """The simple commands of a shell line: the words between |, &&, ; and the like, without
    redirections (`> file`, `2>&1`, `<<'EOF'`)."""
    current: list[str] = []
    skip_target = False
    for w in words:
        if skip_target:
            skip_target = False
            continue
        if set(w) <= set("|&;<>()"):
            if "<" in w or ">" in w:  # a redirection: drop its file descriptor and its target
                if current and current[-1].isdigit():
                    current.pop()
                skip_target = True
                continue
            if current:
                yield current
            current = []
        else:
            current.append(w)
    if current:
        yield current


def sakimi_argv(words: list[str]) -> list[str] | None:
    """The arguments after the program name, if this simple command runs sakimi-next."""
    for i, w in enumerate(words):
        if PROGRAM.search(w):
            return words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "sakimi_next":
            return words[i + 2:]
    return None


def script_calls(words: list[str]) -> tuple[str, list[str]] | None:
    """(script path, its arguments) when this simple command runs `python scripts/X.py ...`."""
    for i, w in enumerate(words):
        if re.fullmatch(r"scripts/[\w.-]+\.py", w) and i > 0 and "python" in words[i - 1]:
            return w, words[i + 1:]
    return None


def lines_of_shell(path: Path):
    text = path.read_text(encoding="utf-8")
    for n, line in code_blocks(text):
        yield n, line
    for n, span in inline_spans(text):
        if re.match(r"(\S*/)?sakimi-next |python -m sakimi_next |torchrun |python scripts/", span):
            yield n, span


def simple_commands():
    for path in DOCS:
        for n, line in lines_of_shell(path):
            try:
                words = shell_words(line)
            except ValueError:  # not shell (Python, a table of text): nothing to check
                continue
            for seg in segments(words):
                yield f"{rel(path)}:{n}", seg


def sakimi_commands() -> list[Command]:
    found = []
    for where, seg in simple_commands():
        argv = sakimi_argv(seg)
        if argv is not None:
            found.append(Command(where, tuple(argv)))
    return found


COMMANDS = sakimi_commands()


def mode_of(argv: tuple[str, ...]) -> str:
    for i, w in enumerate(argv):
        if w == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if w.startswith("--mode="):
            return w.split("=", 1)[1]
    return "test"


def parse(argv: tuple[str, ...]):
    """Parse with the parser of the command's mode, exactly as `sakimi-next` builds it, but without
    abbreviated flags (a doc spells flags out). Returns (namespace or None, error text)."""
    mode = mode_of(argv)
    if mode not in MODES:
        return None, f"unknown mode {mode!r}"
    parser = build_parser(mode)
    parser.allow_abbrev = False
    args = [a for a in argv if a not in ("-h", "--help")]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args), ""
    except SystemExit:
        return None, err.getvalue().strip()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 40
    modes = {mode_of(c.argv) for c in COMMANDS}
    assert set(MODES) <= modes, f"no documented command for {set(MODES) - modes}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_parses(cmd):
    args, error = parse(cmd.argv)
    assert args is not None, f"{cmd.where}: sakimi-next {shlex.join(cmd.argv)}\n  {error}"


def test_a_wrong_flag_fails():
    """The check itself: a flag that does not exist, a flag of another mode, an abbreviation, a bad choice."""
    for argv in (("--mode", "train", "--data-dir", "d", "--no-such-flag"),
                 ("--mode", "generate", "--resume-from", "r", "--data-dir", "d"),
                 ("--mode", "generate", "--resume-from", "r", "--max-new", "5"),
                 ("--mode", "export", "--resume-from", "r", "--format", "onnx"),
                 ("--mode", "chat",)):
        assert parse(argv)[0] is None, argv
    assert parse(("--mode", "train", "--data-dir", "d", "--help"))[0] is not None
    words = shell_words("echo hi | sakimi-next --mode eval --resume-from r --json > out.json 2>&1  # note")
    assert [sakimi_argv(s) for s in segments(words)] == [None, ["--mode", "eval", "--resume-from", "r", "--json"]]
    written = {"runs/mine"}
    assert made_by_a_command("runs/mine/best", written) and made_by_a_command("runs/mine/best/tokenizer.json", written)
    assert not made_by_a_command("runs/tiny/latest", written) and not made_by_a_command("runs/mine/other", written)
    lines = list(code_blocks("```bash\nsakimi-next --mode test \\\n    --seed 1\n```\n"))
    assert shell_words(lines[0][1]) == ["sakimi-next", "--mode", "test", "--seed", "1"]


# ------------------------------------------------------------------------------------------- scripts
def script_flags(script: Path) -> set[str]:
    """The option strings of every add_argument call in a script (its parser is built inside main)."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def test_script_flags_exist():
    calls = [(where, *call) for where, seg in simple_commands() if (call := script_calls(seg))]
    assert calls
    for where, script, argv in calls:
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        flags = script_flags(ROOT / script)
        for a in argv:
            if a.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", a):
                assert a.split("=", 1)[0] in flags, f"{where}: {script} has no flag {a}"


# ------------------------------------------------------------------------------ paths the examples use
MAKEFILE_DIRS = re.compile(r"--out-dir (\S+)")
LINK_NAMES = ("latest", "best")


def written_dirs() -> set[str]:
    """Folders the documented commands (and the Makefile's targets) write: every --out-dir, and the
    default folders of prepare_data (data) and train (runs/PRESET)."""
    out = {"data", "runs/auto", *(f"runs/{m}" for m in ("tiny_5m", "tiny_10m", "tiny_10m_moe", "small_50m"))}
    for cmd in COMMANDS:
        args, _ = parse(cmd.argv)
        if args is not None and getattr(args, "out_dir", None):
            out.add(args.out_dir.rstrip("/"))
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    out |= {d.rstrip("/") for d in MAKEFILE_DIRS.findall(makefile) if "$" not in d}
    out |= {d.replace("$(CHAT_DEMO)", "data/chat-demo") for d in MAKEFILE_DIRS.findall(makefile)}
    return out


def is_checkpoint_name(part: str) -> bool:
    return part in LINK_NAMES or re.fullmatch(r"step_\d+", part) is not None


def made_by_a_command(path: str, written: set[str]) -> bool:
    """`path` is a written folder, a checkpoint inside one (latest, best, step_N), or a file in either."""
    p = Path(path.rstrip("/"))
    for folder in (p, *p.parents):
        if folder.as_posix() in written:
            *middle, last = p.relative_to(folder).parts or ("",)
            return all(map(is_checkpoint_name, middle)) and (last == "" or is_checkpoint_name(last) or "." in last)
    return False


def test_example_paths_are_written_by_a_documented_command():
    """A doc's --resume-from, --init-from, --data-dir (of a mode that reads it) and a tokenizer taken from a
    run must be something an earlier documented command (or make demo / chat-demo) creates."""
    written = written_dirs()
    for cmd in COMMANDS:
        args, _ = parse(cmd.argv)
        if args is None:
            continue
        reads = [getattr(args, "resume_from", None), getattr(args, "init_from", None)]
        if mode_of(cmd.argv) in ("train", "eval") and not getattr(args, "train_data", None):
            reads.append(getattr(args, "data_dir", None))
        tok = getattr(args, "tokenizer", None)
        if tok and tok.startswith("runs/"):
            reads.append(tok)
        for path in reads:
            if path and path != "auto":
                assert made_by_a_command(path, written), (
                    f"{cmd.where}: {path} is not created by any documented command (an --out-dir, "
                    f"or a checkpoint inside one)")


# -------------------------------------------------------------------------------- links and file paths
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:sakimi_next|scripts|tests|docs)/[\w./-]*[\w/])")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out, in_block = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[rel(d) for d in DOCS])
def test_links_and_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{rel(doc)}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(dest), f"{rel(doc)}: link to {target}: no such heading"
    for path in set(REPO_PATH.findall(text)):
        assert (ROOT / path).exists(), f"{rel(doc)} names {path}, which does not exist"
