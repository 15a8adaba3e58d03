"""The command line: `sakimi-next --mode test|prepare_data|train|generate|eval|export|bench [flags]`.

Find the mode, build its parser (`sakimi-next --mode generate --help` shows what generate takes),
check every setting, then run. A bad input prints one line (`error: ...`) and exits with code 2,
without a traceback and before anything is touched.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands import MODES
from .config import ConfigError
from .util import UserError

DEFAULT_MODE = "test"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, except the None/False of flags whose default the help text already explains."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaints as one `error: ...` line (exit code 2) instead of usage + message."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _mode_of(argv: list[str]) -> str:
    pre = _Parser(prog="sakimi-next", add_help=False)
    pre.add_argument("--mode", choices=list(MODES), default=DEFAULT_MODE)
    return pre.parse_known_args(argv)[0].mode


def build_parser(mode: str = DEFAULT_MODE) -> argparse.ArgumentParser:
    command = importlib.import_module(MODES[mode])
    modes = "\n".join(f"  {name:<13} {importlib.import_module(m).HELP}" for name, m in MODES.items())
    p = _Parser(prog=f"sakimi-next --mode {mode}", usage="%(prog)s [flags]", formatter_class=_HelpFormatter,
                description="Qwen3-Next (Gated DeltaNet + Gated Attention) language models at small scale.\n\n"
                            f"modes (sakimi-next --mode MODE --help shows the flags of one):\n{modes}")
    p.add_argument("--mode", choices=list(MODES), default=DEFAULT_MODE, help="what to do")
    command.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = _mode_of(argv)
    command = importlib.import_module(MODES[mode])
    args = build_parser(mode).parse_args(argv)
    try:
        settings = command.settings(args)  # every check, before torch is even imported
        import torch

        # Strongly decaying DeltaNet gates produce denormal floats (exp of -90..-100), which x86 CPUs
        # process up to 100x slower; flushing them to zero changes nothing measurable and saves ~30%.
        torch.set_flush_denormal(True)
        return command.run(settings)
    except (UserError, ConfigError) as e:
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the system refused (a full disk, a permission): one line too (writes clean up after
        # themselves: see util.publish_dir)
        _close_progress_bars()
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End the line of a progress bar the failed work left open (the traceback keeps it alive), so that
    the error has a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
