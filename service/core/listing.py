"""What a `:list` may show: a folder only if the caller can read a secret that exists below it.

A folder is shown at once when one of the caller's read globs covers every path below it (Vault
lists a folder only while some key lies below, and every such key is readable). Otherwise its
subtree is walked breadth first through Vault LIST calls, skipping folders no glob could match
under and stopping at the first readable key. A request spends at most `LIST_BUDGET` LIST calls
on these walks, `LIST_CONCURRENCY` at a time, shared fairly between the folders being decided;
a folder still undecided when the budget is spent is hidden, and the listing marked truncated.

"Exists" means "Vault lists it": a secret whose every version is deleted or destroyed keeps its
metadata, so it is listed (and reads as 404) until its metadata is deleted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NamedTuple

from schemas.errors import NotFound
from schemas.globs import PathGlob

__all__ = ["LIST_BUDGET", "LIST_CONCURRENCY", "Listing", "readable_keys"]

log = logging.getLogger("secrets.listing")

LIST_BUDGET = 64
"""Vault LIST calls one request may spend deciding folders, beyond the listing of its prefix."""
LIST_CONCURRENCY = 4
"""LIST calls one request has in flight at most."""

Lister = Callable[[str], Awaitable[list[str]]]
"""`SecretsManager.list_keys`: the keys right under a prefix; NotFound when there are none."""


class Listing(NamedTuple):
    keys: list[str]
    """The keys to show, in the order given."""
    truncated: bool
    """Some folder was left undecided, and so hidden, when the budget ran out."""
    calls: int
    """LIST calls spent on walks (the prefix's own listing not included)."""


async def readable_keys(
    list_keys: Lister,
    globs: Sequence[PathGlob],
    prefix: str,
    keys: Iterable[str],
    *,
    budget: int = LIST_BUDGET,
    concurrency: int = LIST_CONCURRENCY,
) -> Listing:
    """Of `keys`, Vault's listing of `prefix`, those the caller holding read `globs` may see.

    A key (a secret) is shown if a glob matches it; a folder (ending in ``/``) if a glob covers
    it or a walk finds a readable key below it within `budget` LIST calls. A folder removed
    while walked counts as empty; any other error of a LIST call (VaultUnavailable) is raised.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    keys = list(keys)
    found: set[str] = set()  # keys to show: readable secrets, folders holding one
    # Per folder key, the folders below it still to list, in the order Vault gave them.
    todo: dict[str, list[str]] = {}
    for key in keys:
        full = f"{prefix}/{key}" if prefix else key
        if not key.endswith("/"):
            if any(glob.matches(full) for glob in globs):
                found.add(key)
            continue
        folder = full[:-1]
        if any(glob.covers_all_under(folder) for glob in globs):
            found.add(key)
        elif any(glob.could_match_under(folder) for glob in globs):
            todo[key] = [folder]
    calls = 0
    queue: deque[tuple[str, str]] = deque()
    while todo or queue:
        if not queue:
            # The next level down: one folder of each undecided key in turn, so that a key
            # with a wide subtree cannot spend the budget before the others had their turn.
            level = [[(key, f) for f in folders] for key, folders in todo.items()]
            todo = {}
            turns = itertools.chain.from_iterable(itertools.zip_longest(*level))
            queue.extend(item for item in turns if item is not None)
        batch: list[tuple[str, str]] = []
        while queue and len(batch) < concurrency and calls + len(batch) < budget:
            item = queue.popleft()
            if item[0] not in found:
                batch.append(item)
        if not batch:
            if queue:
                break  # the budget is spent with folders left to list
            continue  # every folder of this level was decided: on to the next
        calls += len(batch)
        listed = await _list_each(list_keys, [folder for _, folder in batch])
        for (key, folder), children in zip(batch, listed, strict=True):
            if key in found:
                continue
            for child in children:
                full = f"{folder}/{child}"
                if not child.endswith("/"):
                    readable = any(glob.matches(full) for glob in globs)
                else:
                    below = full[:-1]
                    readable = any(glob.covers_all_under(below) for glob in globs)
                    if not readable and any(glob.could_match_under(below) for glob in globs):
                        todo.setdefault(key, []).append(below)
                if readable:
                    found.add(key)
                    todo.pop(key, None)
                    break
    undecided = {key for key, _ in queue} | set(todo)
    truncated = not undecided <= found
    if truncated:
        log.warning(
            "listing incomplete: its budget of Vault LIST calls is spent",
            extra={"list_calls": calls, "undecided": len(undecided - found)},
        )
    return Listing([key for key in keys if key in found], truncated, calls)


async def _list_each(list_keys: Lister, folders: list[str]) -> list[list[str]]:
    """The keys under each of `folders`, listed concurrently; [] for one that is gone."""

    async def one(folder: str) -> list[str]:
        try:
            return await list_keys(folder)
        except NotFound:
            return []  # removed since its parent was listed: nothing to find there

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(folder)) for folder in folders]
    except BaseExceptionGroup as failed:
        # One error as the caller knows them (VaultUnavailable: 503), not a group of them.
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
