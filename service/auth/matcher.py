"""`GrantMatcher`: one permission's globs, of every role, compiled into one trie over path segments
whose glob ends carry their roles as bits: a check walks the path once, whatever the policy's size.

The trie is a nondeterministic automaton over segments, equivalent to `PathGlob.regex`:

- a literal segment is a dict entry, so 10,000 literal siblings cost one lookup;
- a whole-segment ``*`` is one edge taking any segment;
- ``pre*suf`` inside a segment is indexed by the lengths of ``pre`` and ``suf``, then looked up
  by the segment's own head and tail: a few dict lookups however many such siblings there are;
- ``**`` that may take zero segments is an edge to a node that loops on any segment, entered
  without consuming one; a trailing ``**`` (one or more segments) is a ``*`` then such a node.

The walk finds the roles whose globs match a path (as bits), whoever asks; states are deduplicated
per segment, which keeps a path of at most 16 segments linear in the trie's nodes even with many
``**`` (no backtracking, unlike a regex alternation). The answer is remembered per path (bounded),
so a path read again costs a dict lookup; the caller's roles are then one AND away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.globs import PathGlob
from schemas.paths import RESERVED_FOLDER, is_reserved, is_valid_path

__all__ = ["GrantMatcher"]

_STAR = "*"
_DOUBLE_STAR = "**"
_MASKS_KEPT = 4096  # role sets whose bits are remembered; tokens carry few distinct ones
# Paths whose matching roles are remembered: at most this many, each this long at most, so the
# memory stays a few MB per permission however many distinct paths callers send.
_PATHS_KEPT = 16_384
_LONGEST_KEPT = 160
_RESERVED_FIRST = RESERVED_FOLDER[0]  # a path not starting so needs no `is_reserved` call
_FEW = 4
# The children of a node that has none: shared, never written (most nodes are leaves, and an
# empty dict each would double the trie's objects).
_NONE: dict[Any, Any] = {}  # states kept without deduplication: most paths have one or two


class _Node:
    __slots__ = (
        "accept", "blind", "closure", "globstar", "literal", "loop", "partial", "simple", "star",
        "wild",
    )  # fmt: skip

    def __init__(self, *, loop: bool = False) -> None:
        self.literal: dict[str, _Node] = _NONE  # a dict of its own once it has a child
        self.star: _Node | None = None
        # (len(pre), len(suf)) -> (pre, suf) -> node, for segments like ``db-*`` or ``*-old``.
        self.partial: dict[tuple[int, int], dict[tuple[str, str], _Node]] = _NONE
        self.globstar: _Node | None = None  # entered without taking a segment
        self.loop = loop  # a zero-or-more ``**`` node: any segment stays here
        self.accept = 0  # roles whose glob ends here
        self.closure: tuple[_Node, ...] = ()
        self.wild: tuple[_Node, ...] = ()  # where any segment leads: itself if a loop, `*`
        self.simple = True  # literal children only: the common step is one dict lookup
        self.blind = False  # no literal or partial child: any segment leads to `wild`


class GrantMatcher:
    """The globs each role holds for one permission, as one trie; roles as bits of an int."""

    __slots__ = ("_known", "_masks", "_root", "_start", "bits")

    def __init__(self, grants: Mapping[str, Iterable[PathGlob]]) -> None:
        """`grants`: role -> its globs for this permission. Roles without a glob get no bit."""
        self.bits: dict[str, int] = {}
        self._masks: dict[frozenset[str], int] = {}
        self._known: dict[str, int] = {}  # path -> roles_matching(path), bounded
        self._root = _Node()
        for role, globs in grants.items():
            for glob in globs:
                bit = self.bits.setdefault(role, 1 << len(self.bits))
                self._add(glob, bit)
        _finish(self._root)
        self._start = self._root.closure

    def mask(self, roles: Iterable[str]) -> int:
        """The bits of `roles` (unknown roles add nothing)."""
        if type(roles) is frozenset:  # a Principal's roles: the same few sets, again and again
            want = self._masks.get(roles)
            if want is not None:
                return want
        bits = self.bits
        want = 0
        for role in roles:
            want |= bits.get(role, 0)
        if type(roles) is frozenset and len(self._masks) < _MASKS_KEPT:
            self._masks[roles] = want
        return want

    def allows(self, roles: Iterable[str], path: str) -> bool:
        """True if a glob of one of `roles` matches `path`: `mask` and `roles_matching` in one
        call, the remembered answers looked up first (the hot path of every request)."""
        want = self._masks.get(roles) if type(roles) is frozenset else None
        if want is None:
            want = self.mask(roles)
        if not want:
            return False
        found = self._known.get(path)
        if found is None:
            found = self._learn(path)
        return found & want != 0

    def matches(self, path: str, want: int) -> bool:
        """True if a glob of a role in `want` matches `path` (never an invalid or reserved one)."""
        return self.roles_matching(path) & want != 0

    def roles_matching(self, path: str) -> int:
        """The bits of the roles with a glob matching `path`: 0 for an invalid path or one in the
        reserved folder, whatever the globs say. Remembered for the paths asked most recently."""
        found = self._known.get(path)
        return self._learn(path) if found is None else found

    def _learn(self, path: str) -> int:
        if not is_valid_path(path) or (path[0] == _RESERVED_FIRST and is_reserved(path)):
            return 0
        found = self._walk(path)
        if len(path) <= _LONGEST_KEPT:
            known = self._known
            if len(known) >= _PATHS_KEPT:
                known.clear()
            known[path] = found
        return found

    def _walk(self, path: str) -> int:
        states: Sequence[_Node] = self._start
        for segment in path.split("/"):
            if len(states) == 1:  # the common case: one state, one kind of child
                node = states[0]
                if node.simple:
                    found = node.literal.get(segment)
                    if found is None:
                        return 0
                    states = found.closure
                    continue
                if node.blind:
                    states = node.wild
                    if not states:
                        return 0
                    continue
            after: list[_Node] = []
            for node in states:
                after += node.wild
                found = node.literal.get(segment)
                if found is not None:
                    after += found.closure
                if node.partial:
                    size = len(segment)
                    for (head, tail), by_parts in node.partial.items():
                        if head + tail <= size:
                            found = by_parts.get((segment[:head], segment[size - tail :]))
                            if found is not None:
                                after += found.closure
            if not after:
                return 0
            if len(after) > _FEW:
                # Two states may reach one node: without this, repeats could double each segment.
                after = list(dict.fromkeys(after))
            states = after
        if len(states) == 1:
            return states[0].accept
        accepted = 0
        for node in states:
            accepted |= node.accept
        return accepted

    def _add(self, glob: PathGlob, bit: int) -> None:
        segments = list(glob.segments)
        if segments[-1] == _DOUBLE_STAR:
            # A trailing `**` takes one or more segments: one segment, then zero or more.
            segments.insert(-1, _STAR)
        node = self._root
        for segment in segments:
            node = _child(node, segment)
        node.accept |= bit


def _child(node: _Node, segment: str) -> _Node:
    if segment == _DOUBLE_STAR:
        if node.globstar is None:
            node.globstar = _Node(loop=True)
        return node.globstar
    if segment == _STAR:
        if node.star is None:
            node.star = _Node()
        return node.star
    if _STAR in segment:
        head, _, tail = segment.partition(_STAR)
        if node.partial is _NONE:
            node.partial = {}
        by_parts = node.partial.setdefault((len(head), len(tail)), {})
        found = by_parts.get((head, tail))
        if found is None:
            found = by_parts[(head, tail)] = _Node()
        return found
    if node.literal is _NONE:
        node.literal = {}
    found = node.literal.get(segment)
    if found is None:
        found = node.literal[segment] = _Node()
    return found


def _finish(root: _Node) -> None:
    """Set what the walk reads from each node: `closure` (itself, then the ``**`` nodes it enters
    without taking a segment), `wild`, `simple` and `blind`."""
    nodes = []
    stack = [root]  # not recursion: a trie may be wide and 17 levels deep
    while stack:
        node = stack.pop()
        nodes.append(node)
        closure = [node]
        step = node.globstar
        while step is not None:  # `**/**` is refused by PathGlob; followed anyway
            closure.append(step)
            step = step.globstar
        node.closure = tuple(closure)
        stack.extend(_children(node))
    for node in nodes:  # once every closure is known
        node.wild = ((node,) if node.loop else ()) + (node.star.closure if node.star else ())
        node.simple = not (node.loop or node.star or node.partial)
        node.blind = not (node.literal or node.partial)


def _children(node: _Node) -> list[_Node]:
    found = list(node.literal.values())
    for by_parts in node.partial.values():
        found.extend(by_parts.values())
    if node.star is not None:
        found.append(node.star)
    if node.globstar is not None:
        found.append(node.globstar)
    return found
