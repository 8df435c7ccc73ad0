"""The images index behind an alias: readers and writers use `Settings.images_index` (e.g.
`orchard-images`), an alias of one numbered index (`orchard-images-<n>`). `orchard setup` creates
`<alias>-1`; `orchard reindex` builds `<alias>-<n+1>` from the lake and moves the alias in one atomic
`_aliases` call, so readers never see a missing or half-built index.

Owned here: the numbered names, and the alias actions of a swap. Pure functions (the clients are
the callers').
"""

from __future__ import annotations

import re


def numbered(alias: str, number: int) -> str:
    """The name of the alias's index number `number`: `<alias>-<number>`."""
    return f"{alias}-{number}"


def number_of(alias: str, index: str) -> int | None:
    """n if `index` is `<alias>-<n>`, else None."""
    found = re.fullmatch(re.escape(alias) + r"-(\d+)", index)
    return int(found.group(1)) if found else None


def next_index(alias: str, existing: list[str]) -> str:
    """The next numbered index after every `<alias>-<n>` in `existing` (`<alias>-1` if none)."""
    numbers = [n for n in (number_of(alias, name) for name in existing) if n is not None]
    return numbered(alias, max(numbers, default=0) + 1)


def swap_actions(alias: str, new: str, old: list[str], legacy: bool) -> list[dict]:
    """The `_aliases` actions that point `alias` at `new` alone (its write index). `old`: the indices
    it points at now; `legacy`: `alias` is itself an index (made before the alias existed), removed
    in the same call, since an alias cannot share an index's name."""
    actions: list[dict] = [{"remove_index": {"index": alias}}] if legacy else []
    actions += [{"remove": {"index": index, "alias": alias}} for index in old]
    actions.append({"add": {"index": new, "alias": alias, "is_write_index": True}})
    return actions
