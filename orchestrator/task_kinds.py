"""The task kinds a sweep can name: the orchestrator asks `environments` (its one task registry).

No task is listed here. A spec's task kind is a registered name (`environments.available_tasks()`:
the animal-learning tasks, "atari", "gym", ...) or an importable module path ("my_package.my_task");
`environments.TaskKind` says which parameters a spec may set, checks them and fills in defaults,
gives the observation size, the streams and the error measures (docs/environments.md).

Task parameters are passed to the environment as written (a TOML list becomes a tuple, e.g.
`iti_range = [80, 120]`); they are not grid axes: write one [[tasks]] table per setting.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import environments
from environments import TaskKind, task_kind

__all__ = ["TASK_KINDS", "TaskKind", "task_kind", "unknown_task_message"]


def unknown_task_message(kind: Any) -> str:
    known = list(environments.available_tasks())
    close = difflib.get_close_matches(str(kind), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (expected one of: {', '.join(known)})"
    return f"unknown kind {kind!r}{hint} (or an importable module path such as 'my_package.my_task')"


class _Kinds(Mapping):
    """The registered task kinds by name (a later `environments.register_task` shows)."""

    def __getitem__(self, name: str) -> TaskKind:
        if name not in environments.available_tasks():
            raise KeyError(name)
        return task_kind(name)

    def __iter__(self) -> Iterator[str]:
        return iter(environments.available_tasks())

    def __len__(self) -> int:
        return len(environments.available_tasks())


TASK_KINDS: Mapping[str, TaskKind] = _Kinds()
