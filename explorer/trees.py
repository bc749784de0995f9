"""Draft trees as plain lists: one `parents` list per tree (parents[i] = index of node i's parent, -1 for the
children of the committed prefix; parents precede their children). Everything else is derived here, with no
torch, so that traces, the store, exports and views can read trees without loading a model library."""

from __future__ import annotations

from collections.abc import Sequence


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node (children of the cached prefix have depth 0); parents must come before children."""
    depth: list[int] = []
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}: parents must precede their children (or be -1)")
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return depth


def node_positions(position: int, parents: Sequence[int]) -> list[int]:
    """The sequence position each node of a tree drafted at `position` would take if accepted."""
    return [position + depth for depth in tree_depths(parents)]


def children(parents: Sequence[int]) -> dict[int, list[int]]:
    """Each node's children in order (key -1: the root's children)."""
    kids: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        kids.setdefault(parent, []).append(node)
    return kids


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node` (inclusive); [] for node -1."""
    path: list[int] = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
