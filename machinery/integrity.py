"""What a run folder checks before it trusts itself: one writer at a time, and every file a resume
reads, so that a damaged one stops the run with one line instead of a traceback, or worse, training
on from corrupted weights.

- One writer: a lock (`lock`, an flock on the file, which names the process that holds it), taken
  when a run starts or resumes and given back when it ends, or by the kernel when its process dies.
  A second process refuses, naming the holder. With torchrun, rank 0 holds it for all the run's
  processes.
- JSON and JSON lines: read line by line, each a JSON object, or a DataError naming the line.
- Digests: the size and SHA-256 of every file of a checkpoint, written into state.json when the
  checkpoint is committed and compared before it is loaded, so a truncated file or one flipped byte
  is caught.
"""

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from data import DataError

LOCK = "lock"


def _holder(path):
    """The lock's contents ({pid, host, since}), or None if unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


HELD = {}  # (device, inode) of a lock file -> its open file, held (flock) by this process


def _key(stat):  # a file by its inode: a new run's lock is taken in a temp folder that is then renamed
    return stat.st_dev, stat.st_ino


def take_lock(folder):
    """folder/lock held by this process, or a DataError naming the process that holds it.

    The hold is the kernel's (flock on the open file), not the file's existence: it ends when the
    process does, however it ends, so a killed run's folder is free again at once, and a PID the
    system has since given to another process (a restarted container's) means nothing. The file's
    contents (PID, host, since) only say who holds it."""
    path = Path(folder) / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        holder = _holder(path) or {}
        raise DataError(f"'{folder}' is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                        f"{holder.get('since')}): wait for it to end, or stop it") from None
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    f.flush()
    HELD[_key(os.fstat(f.fileno()))] = f
    return path


def release_lock(folder):
    """Lets go of folder/lock if this process holds it. (The file stays: removing it while another
    process opens it to wait would give the two of them two different files to lock.)"""
    try:
        f = HELD.pop(_key((Path(folder) / LOCK).stat()), None)
    except FileNotFoundError:
        return
    if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


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
