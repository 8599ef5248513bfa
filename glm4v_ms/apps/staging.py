"""Temporary folders next to a destination, built there and renamed into place, and found again after a kill.

``make_temp_dir(parent, stem)`` creates ``.<stem>-<pid>-<hex>`` holding an owner file (pid, host, process start
time); ``clean_stale(dst)`` finds the ``.<DST name>.converting-...`` / ``.<DST name>.old-...`` folders whose owner
process is gone (SIGKILL, out of memory, power loss) and removes them, or puts an ``.old`` one back when DST is
missing. Folders without our owner file, or whose owner still runs or lives on another host, are never touched.
Used by the converter (convert.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from typing import Callable, List, Optional


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsync every file and folder under ``root`` (a folder's entry list is data too: a rename needs it on disk)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


OWNER_FILE = ".glm4v_ms-owner.json"  # inside each temporary folder: which process made it (see clean_stale)


def _new_name(parent: str, stem: str) -> str:
    """An unused hidden name in ``parent``: .<stem>-<pid>-<random>."""
    while True:
        path = os.path.join(parent, f".{stem}-{os.getpid()}-{secrets.token_hex(3)}")
        if not os.path.lexists(path):
            return path


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), which tells a reused pid from the
    original; None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the "(comm)" field
    except (OSError, ValueError, IndexError):
        return None


def _write_owner(folder: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "tool": "glm4v_ms.convert"}
    with open(os.path.join(folder, OWNER_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f)


def _owner_gone(folder: str) -> Optional[int]:
    """The pid of the conversion that made ``folder`` when that process is gone (on this host), else None (alive,
    another host's, or no owner file: not ours to judge)."""
    try:
        with open(os.path.join(folder, OWNER_FILE), "r", encoding="utf-8") as f:
            info = json.load(f)
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except PermissionError:  # alive, another user's
        return None
    start = info.get("start")
    return pid if start is not None and _start_time(pid) not in (None, start) else None  # pid reused by another


def _empty_and_gone(folder: str, pid: int) -> Optional[int]:
    """A folder killed between its creation and its owner file (empty, or holding only a partial owner file) whose
    name's pid no longer runs: ``pid``, else None. Nothing of value can be in it."""
    try:
        entries = os.listdir(folder)
        if any(e != OWNER_FILE for e in entries) or pid == os.getpid():
            return None
        os.kill(pid, 0)
    except ProcessLookupError:
        return pid
    except OSError:
        return None
    return None


def _make_temp_dir(parent: str, stem: str) -> str:
    while True:
        path = _new_name(parent, stem)
        try:
            os.mkdir(path)  # mode 0o777 minus the umask, like any folder the user creates (mkdtemp would give 0o700)
        except FileExistsError:
            continue
        try:
            _write_owner(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return path


def clean_stale(dst: str, log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Find the temporary folders that earlier conversions to ``dst`` left next to it when they were killed
    (SIGKILL, out of memory, power loss) and deal with them; returns what was done, one line each (also passed
    to ``log``).

    Only folders named like ours (``.<DST name>.converting-<pid>-<hex>`` or ``.<DST name>.old-<pid>-<hex>``) that
    hold our owner file naming a process of this host that no longer runs are touched: a ``.converting`` folder is
    deleted; an ``.old`` folder (the previous DST moved aside just before the new one was renamed into place) is
    renamed back to DST when DST is missing, otherwise deleted."""
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    pattern = re.compile(r"\." + re.escape(base) + r"\.(converting|old)-(\d+)-[0-9a-f]{6}")
    done: List[str] = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return done
    for entry in entries:
        m = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if m is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = _owner_gone(path)
        if pid is None:
            pid = _empty_and_gone(path, int(m.group(2)))
        if pid is None:
            continue
        if m.group(1) == "old" and not os.path.lexists(dst):
            os.remove(os.path.join(path, OWNER_FILE))
            os.rename(path, dst)
            line = (f"restored {dst} from {path}: a conversion (pid {pid}) was killed while replacing it")
        else:
            size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
            shutil.rmtree(path)
            line = (f"removed {path} ({size} bytes), left by a conversion (pid {pid}) that was killed")
        done.append(line)
        if log is not None:
            log(line)
    return done


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
