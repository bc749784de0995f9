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


def parse_widths(text: str) -> list[int]:
    """'3,2,1' -> [3, 2, 1]: children per node at each depth of a uniform tree (at most 8 levels)."""
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"widths must be comma-separated counts like '2,2,1', got {text!r}") from None
    if not widths or min(widths) < 1 or len(widths) > 8:
        raise ValueError(f"widths must be 1 to 8 comma-separated counts >= 1 like '2,2,1', got {text!r}")
    return widths


def uniform_tree_size(widths: Sequence[int]) -> int:
    """Nodes of the tree with widths[d] children under every node of depth d - 1: w1 + w1 w2 + ..."""
    nodes, level = 0, 1
    for width in widths:
        level *= width
        nodes += level
    return nodes
