"""Fault injection for the fault-tolerance tests. Off unless the environment variables are set.

``ATR_FAIL_ENCODE_AFTER=k``: the encode actor process exits abruptly after encoding k samples.
``ATR_FAIL_DRIVER_AFTER_COMMITS=k``: the driver exits abruptly after its k-th shard commit.
``ATR_FAILPOINT_DIR``: when set, each failpoint fires once per directory (a marker file records it), so a
restarted actor or a rerun proceeds normally.
"""

from __future__ import annotations

import os
from pathlib import Path


def _fires_once(name: str) -> bool:
    directory = os.environ.get("ATR_FAILPOINT_DIR")
    if not directory:
        return True
    try:
        (Path(directory) / name).open("x").close()
    except FileExistsError:
        return False
    return True


def maybe_fail(name: str, count: int) -> None:
    """Exit the process without cleanup when failpoint ``name`` is armed and ``count`` reached its limit."""
    limit = os.environ.get(name)
    if limit is None or count < int(limit):
        return
    if _fires_once(name):
        os._exit(17)
