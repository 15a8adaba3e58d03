"""Small shared helpers: atomic file and directory writes, user-facing errors, hashing."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input: the CLI prints the message as one line and exits with code 2."""


say = functools.partial(print, flush=True)  # progress lines should show up at once in logs too


def progress(total: int, desc: str, leave: bool = True):
    """A tqdm bar counting bytes (so it shows MB/s) on stderr, drawn only when stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, mininterval=0.5, leave=leave)


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_failed(path: Path, e: OSError, existed: bool, scratch: Path | None = None) -> UserError:
    """The one line for a write of `path` that the system refused (a full disk, a lost permission):
    nothing was replaced, and the partial files are gone. The file named is left out when it is one of
    ours under `scratch` (a temporary name says nothing to the user)."""
    name = e.filename and Path(e.filename)
    where = f" ({name})" if name and not (scratch and name.is_relative_to(scratch)) else ""
    reason = e.strerror or (f"{e} (a short write: is the disk full?)" if e.errno is None else str(e))
    kept = f"the previous {path} is intact" if existed else "nothing was written"
    return UserError(f"could not write {path}: {reason}{where}; {kept}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` for the caller to write; then flushed to disk, given the usual
    permissions and renamed to `path`, so that readers see either the old file or the complete new one.
    On failure it is removed; a write the system refuses is a UserError (see `write_failed`)."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_failed(path, e, existed) from None
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, e, existed, Path(tmp)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one. A write
    the system refuses is a UserError (see `write_failed`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if rename2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to disk."""
    os.chmod(root, 0o777 & ~umask())  # mkdtemp makes private directories
    for dirpath, _, files in os.walk(root):
        for name in files:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


def recover_dir(final: str | Path) -> None:
    """Put back the previous result of an interrupted two-rename publish (see `publish_dir`)."""
    final = Path(final)
    old = final.parent / f".{final.name}.old"
    if old.is_dir() and not os.path.lexists(final):
        os.rename(old, final)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def publish_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory and publish it at `final` atomically.

        with publish_dir(out) as tmp:
            write files into tmp

    The body writes into a temporary sibling of `final`; on success every file is fsync'd and the new
    directory takes the place of the old one, so that at every instant `final` is either the old
    complete directory or the new complete one (where the system cannot swap two directories in one
    step, the old one waits as `.NAME.old` for the instant between two renames and `recover_dir` puts it
    back after a crash). On failure or interruption the temporary directory is removed and `final` is
    untouched. Re-publishing is a swap: the old version is deleted only once the new one is in place.
    A write the system refuses (a full disk...) is a UserError saying so (see `write_failed`).
    """
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise UserError(f"{final} exists and is not a directory; it is left as it is")
    existed = final.exists()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise write_failed(final, e, existed) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if not os.path.lexists(final):
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            pass  # tmp now holds the previous version
        else:
            old = final.parent / f".{final.name}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            os.rename(old, tmp)
        fsync_dir(final.parent)
    except OSError as e:
        raise write_failed(final, e, existed, tmp) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with a write the system refuses raised as the OSError it is
    (safetensors reports a full disk as a SafetensorError naming the OS error)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def carry_over(old: Path, new: Path, skip: set[str]) -> None:
    """Hard-link (or copy) the entries of directory `old` that are not in `skip` into `new`, so that a
    directory rebuilt with `publish_dir` keeps what else the user kept in it."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_REQUIRED = object()


def read_json_file(path: str | Path):
    """The parsed content of a JSON file; unreadable or invalid JSON is a UserError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def read_jsonl(path: str | Path, must: str, errors: str = "strict", hint: str = "") -> Iterator[tuple[str, object]]:
    """("path:line", record) of each non-blank line of a JSONL file (a leading BOM dropped). A line that
    is not UTF-8 (`errors` "strict") or not JSON is a UserError naming the file, the line (and the byte
    offset), and saying that each line `must` be ...; `hint` ends the UTF-8 error."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not valid UTF-8 ({e.reason} at byte offset {offset + e.start}, "
                                f"line {lineno}); convert it to UTF-8{hint}") from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); each line {must}") from None
            yield where, record


def json_kind(v) -> str:
    """How a JSON value is called in an error message."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), "a number")


def json_object(value, where: str | Path) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where} must hold a JSON object, not {json_kind(value)}")
    return value


def json_field(d: dict, where: str | Path, name: str, ok, must: str, default=_REQUIRED):
    """`d[name]`, checked: `ok(value)` must hold, else a UserError naming the file, the field and what it
    must be. A missing field is `default`, or an error when there is none."""
    if name not in d:
        if default is _REQUIRED:
            raise UserError(f"{where} lacks the field {name!r}")
        return default
    value = d[name]
    if not ok(value):
        raise UserError(f"{where}: field {name!r} is {json.dumps(value)[:60]}; it must be {must}")
    return value


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def inside(directory: str | Path, name, where: str | Path) -> Path:
    """`directory / name` for a file name read from metadata (`where`), refused unless it is a plain
    relative name that stays inside `directory`, symlinks included."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{where} names the file {name!r}, which is not a relative path inside {directory}")
    path = directory / name
    if not path.resolve().is_relative_to(directory.resolve()):
        raise UserError(f"{where} names {name!r}, which leads outside {directory} (through a symlink)")
    return path


def resolve_device(name: str = "auto"):
    """`auto` prefers cuda, then mps, then cpu. Asking for a device that is not there is a UserError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"device {name!r} does not exist: this machine has {n} CUDA device{'s' * (n != 1)} "
                        f"(cuda:0 to cuda:{n - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was requested but MPS is not available on this machine")
    return device


def format_table(rows: list[tuple], headers: tuple | None = None) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    if headers:
        rows = [tuple(headers)] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def fmt(r):
        cells = []
        for c, w in zip(r, widths):
            numeric = c.replace(",", "").replace(".", "").replace("-", "").isdigit()
            cells.append(c.rjust(w) if numeric else c.ljust(w))
        return "  ".join(cells).rstrip()

    lines = [fmt(r) for r in rows]
    if headers:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def new_figure(ncols: int = 1, figsize: tuple[float, float] = (8, 4.5)):
    """(figure, axes) from matplotlib's file-only backend, for `save_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize, dpi=100)


def save_png(fig, path: str | Path, **savefig_kwargs) -> None:
    """Lay out `fig`, write it atomically as a PNG, and free it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
