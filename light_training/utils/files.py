"""Crash-safe file writing and small JSON helpers shared by every stage.

Every output of the project (preprocessed cases, checkpoints, predictions, metric tables) is written to a
temporary name in the destination directory and then moved into place with ``os.replace``, which is atomic
on POSIX and Windows when source and destination are on the same file system. A killed process therefore
leaves either the previous file or the complete new one, never a truncated file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["atomic_path", "save_json_atomic", "load_json", "to_jsonable", "dumps_readable_json",
           "remove_stale_temporaries", "TEMP_MARKER"]

# Temporary files carry this marker so that leftovers of a killed process are recognisable (and ignorable).
TEMP_MARKER = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on normal exit move it onto ``path`` atomically.

    The temporary name keeps the full file name as its suffix (``.tmp-<pid>-<id>-case.nii.gz``), so writers
    that choose the format from the extension (SimpleITK, ``np.savez``) behave as for the final name; the
    writer's process id lets :func:`remove_stale_temporaries` tell a killed writer's leftover from a live one.
    If the body raises, the temporary file is removed and ``path`` is left untouched.
    The parent directory is created when missing.

    Example::

        with atomic_path("out/result.csv") as tmp:
            df.to_csv(tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield str(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"atomic write of {final}: the writer did not create {tmp}")
        os.replace(tmp, final)
    finally:
        # Only still present if the body failed or os.replace raised.
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _written_by_another_live_process(entry: str) -> bool:
    """True when the temporary ``entry`` names a process id (``.tmp-<pid>-...``) other than this one that
    still runs (or may run: another user's). This process cannot be mid-write when a stage starts, so a file
    with its own id is a leftover of an earlier process that had the same id (e.g. in a container)."""
    pid_text = entry[len(TEMP_MARKER):].split("-", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except OSError:  # PermissionError: it exists under another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the files that writers killed mid-write left in ``folder`` under :func:`atomic_path`'s temporary
    names (``.tmp-<pid>-<id>-<name>``); returns their names. Call it when a stage starts writing into its
    folder: a temporary whose writing process still runs is kept, so a second process writing into the same
    folder is never disturbed."""
    folder = os.fspath(folder)
    removed = []
    if os.path.isdir(folder):
        for entry in sorted(os.listdir(folder)):
            if entry.startswith(TEMP_MARKER) and not _written_by_another_live_process(entry):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, entry))
                    removed.append(entry)
    return removed


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, paths and non-finite floats into plain JSON values.

    NaN and +-Inf become ``None`` (JSON has no representation for them; ``json.dump`` would otherwise write
    the non-standard tokens ``NaN``/``Infinity`` that strict parsers reject).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def dumps_readable_json(obj: Any, indent: int = 2) -> str:
    """JSON text indented for reading, but with lists of numbers kept on one line.

    Keeps files such as case properties (thousands of ``[z, y, x]`` triples) compact while staying readable.
    """
    def is_leaf_list(value: Any) -> bool:
        return isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value)

    def render(value: Any, level: int) -> str:
        pad, pad_inner = " " * (indent * level), " " * (indent * (level + 1))
        if isinstance(value, dict):
            if not value:
                return "{}"
            items = [f"{pad_inner}{json.dumps(str(k))}: {render(v, level + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(value, list):
            if is_leaf_list(value):
                return json.dumps(value, allow_nan=False)
            if all(is_leaf_list(v) for v in value):
                # A list of short numeric rows (coordinates, boxes): one line as well.
                return "[" + ", ".join(json.dumps(v, allow_nan=False) for v in value) + "]"
            items = [f"{pad_inner}{render(v, level + 1)}" for v in value]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(value, allow_nan=False)

    return render(to_jsonable(obj), 0) + "\n"


def save_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (numpy values converted, NaN written as null)."""
    text = dumps_readable_json(obj, indent=indent)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising errors that name the file (missing or not valid JSON)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid JSON file ({error})") from error
