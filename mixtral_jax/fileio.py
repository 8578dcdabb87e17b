"""Files that appear whole or not at all, and JSON files read with one-line errors.

`atomic_directory` is the one way a directory is written (model checkpoints, exports, the final
model of a run): into a staging directory beside it, renamed into place only when complete.
`atomic_write_text` does the same for one file; `read_json` reads one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

from mixtral_jax.config import ConfigError


@contextlib.contextmanager
def atomic_directory(
    target: str, *, overwrite: bool = False, owner: bool = True, suffix: str = ".partial"
) -> Iterator[str]:
    """Yields a fresh, empty staging directory `target + suffix` that becomes `target`.

    When the block ends normally the staging directory is renamed to `target` (with `overwrite`,
    an existing `target` is removed first; without, a non-empty one makes the rename fail); when
    it raises, the staging directory is removed. A stale staging directory is cleared first and
    missing parent directories are made. `owner=False` (the other processes of a write several
    processes share, `owner` being the one that renames): the staging path only, this process
    makes, renames and removes nothing.
    """
    target = os.path.abspath(target)
    staging = target + suffix
    if not owner:
        yield staging
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if overwrite:
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through `path + ".tmp"` and a rename: readers see the old
    file or the whole new one."""
    staging = path + ".tmp"
    try:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)


def read_json(path: str, what: str) -> Any:
    """The parsed JSON file `path`; `what` names it in errors (e.g. "config.json").

    Raises:
      ConfigError: one line naming the path: the file is missing or unreadable, not UTF-8 or
        not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
