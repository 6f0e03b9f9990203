"""What a run folder checks before it trusts itself: one writer at a time, and every file a resume
reads, so that a damaged one stops the run with one line instead of a traceback, or worse, training
on from corrupted weights.

- One writer: a lock file (`lock`: the PID and host of the process that holds the folder), taken
  when a run starts or resumes and removed when it exits. A second process refuses, naming the
  holder; a lock whose process is gone (killed, on this host) is taken over. With torchrun, rank 0
  holds it for all the run's processes.
- JSON and JSON lines: read line by line, each a JSON object, or a DataError naming the line.
- Digests: the size and SHA-256 of every file of a checkpoint, written into state.json when the
  checkpoint is committed and compared before it is loaded, so a truncated file or one flipped byte
  is caught.
"""

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from data import DataError

LOCK = "lock"


def _holder(path):
    """The lock's contents ({pid, host, since}), or None while it is being written or if unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(holder):
    """Whether the lock's process may still run: certainly gone only on this host, by its PID."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def take_lock(folder):
    """folder/lock made ours (O_EXCL: of two processes, one wins), or a DataError naming its holder."""
    path = Path(folder) / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None and time.time() - path.stat().st_mtime < 10:
                time.sleep(1)  # another process is writing its lock this moment: look again
                continue
            if holder is not None and _alive(holder):
                raise DataError(f"'{folder}' is in use by process {holder['pid']} on {holder.get('host')} (since "
                                f"{holder.get('since')}): wait for it to end; if it is gone, remove {path}") from None
            path.unlink(missing_ok=True)  # left by a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                      f)
        return path
    raise DataError(f"'{folder}' is being taken by another process: try again, or remove {path}")


def release_lock(folder):
    """Removes folder/lock if it is this process's."""
    path = Path(folder) / LOCK
    holder = _holder(path)
    if holder and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def damaged(path, what, fix="restore it from a copy, or start a new run"):
    return DataError(f"cannot resume: '{path}' is damaged ({what}): {fix}")


def read_json(path):
    """A JSON object from path, or a DataError saying what is wrong with the file."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise damaged(path, f"not JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise damaged(path, f"a JSON {type(value).__name__}, not an object")
    return value


def read_jsonl(path, lines=None):
    """The JSON objects of a JSON-lines file (its first `lines` only, when given), or a DataError
    naming the line that is not one."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    rows = []
    for number, line in enumerate(text.splitlines()[:lines], 1):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise damaged(path, f"line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise damaged(path, f"line {number} is not a JSON object")
        rows.append(row)
    if lines is not None and len(rows) < lines:
        raise damaged(path, f"{len(rows)} lines where state.json counts {lines}")
    return rows


def file_digest(path):
    """[size, SHA-256] of a file."""
    with open(path, "rb") as f:
        return [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def digests(root, target):
    """{path relative to root: [size, SHA-256]} of the file `target`, or of every file under it."""
    target = Path(target)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return {str(p.relative_to(root)): file_digest(p) for p in files}


def check_digests(root, recorded, target):
    """Every file recorded under `target` (relative to root) is there, of the size and SHA-256 it
    was written with; a DataError naming the first that is not."""
    prefix = str(target)
    mine = {name: value for name, value in recorded.items() if name == prefix or name.startswith(prefix + "/")}
    if not mine:
        raise damaged(Path(root) / target, "state.json records no digest of it")
    for name, (size, sha) in sorted(mine.items()):
        path = Path(root) / name
        if not path.is_file():
            raise damaged(path, "missing")
        if file_digest(path) != [size, sha]:
            raise damaged(path, f"its size or SHA-256 differs from what was written ({size:,} bytes)")
