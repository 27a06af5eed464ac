"""Partition: group the nodes TVM can take into regions; everything else stays in PyTorch.

Regions are formed without creating cycles. Each node gets a level: the largest number of unsupported
nodes on any path from the graph inputs to it. Levels never decrease along an edge and rise after every
unsupported node, so a path that leaves a group of same-level supported nodes through PyTorch can never
come back into it. Each connected component of a level group becomes one region; a networkx check of the
region graph guards that argument at run time.

Components of one level that read a common value (the query, key and value projections of one input) are
joined into one region: no path can run between two components of a level (it would have to leave through
PyTorch, which raises the level), so the join cannot form a cycle, and each region call saved is a round trip
through DLPack and the VM (about 2 of BERT-base's 5 calls per layer).
"""

from __future__ import annotations

import logging
from typing import Callable

import networkx as nx
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from sparsecc.errors import StageError
from sparsecc.settings import Settings

log = logging.getLogger(__name__)

REGION_PREFIX = "sparsecc_region_"

NodePredicate = Callable[[fx.Node], bool]


def partition_regions(gm: fx.GraphModule, settings: Settings, is_supported: NodePredicate,
                      is_anchor: NodePredicate) -> fx.GraphModule:
    """Fuse supported regions that hold at least one anchor node (a sparse op) into call_module nodes
    named `sparsecc_region_<i>`. is_supported and is_anchor come from codegen, which knows TVM."""
    regions = find_regions(gm, is_supported, is_anchor)
    if not regions:
        log.info("partition: no region for TVM; the graph stays in PyTorch")
        return gm
    _check_acyclic(gm, regions)
    fused = fuse_by_partitions(gm, [dict.fromkeys(r) for r in regions], prefix=REGION_PREFIX,
                               always_return_tuple=True)
    log.info("partition: %d regions for TVM (%s nodes)", len(regions), [len(r) for r in regions])
    return fused


def find_regions(gm: fx.GraphModule, is_supported: NodePredicate, is_anchor: NodePredicate) -> list[list[fx.Node]]:
    level: dict[fx.Node, int] = {}
    candidates: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            level[node] = 0
            continue
        base = max((level[p] for p in node.all_input_nodes), default=0)
        if node.op == "call_function" and is_supported(node):
            candidates.add(node)
            level[node] = base
        else:
            level[node] = base + 1

    links = nx.Graph()
    links.add_nodes_from(candidates)
    links.add_edges_from(
        (p, n) for n in candidates for p in n.all_input_nodes if p in candidates and level[p] == level[n]
    )
    # Siblings: candidates of one level reading the same outside value are linked through it.
    readers: dict[tuple[fx.Node, int], fx.Node] = {}
    for n in candidates:
        for p in n.all_input_nodes:
            if p not in candidates and p.op != "get_attr":
                first = readers.setdefault((p, level[n]), n)
                links.add_edge(first, n)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    regions = []
    for component in nx.connected_components(links):
        if not any(is_anchor(n) for n in component):
            continue
        members = set(component)
        # Constants used only inside the region travel with it (TVM then sees them at compile time).
        for n in component:
            for p in n.all_input_nodes:
                if p.op == "get_attr" and all(u in members for u in p.users):
                    members.add(p)
        regions.append(sorted(members, key=order.__getitem__))
    regions.sort(key=lambda r: order[r[0]])
    return regions


def _check_acyclic(gm: fx.GraphModule, regions: list[list[fx.Node]]) -> None:
    owner = {n: f"region{i}" for i, r in enumerate(regions) for n in r}
    quotient = nx.DiGraph()
    for node in gm.graph.nodes:
        here = owner.get(node, node)
        quotient.add_node(here)
        for user in node.users:
            there = owner.get(user, user)
            if there != here:
                quotient.add_edge(here, there)
    if not nx.is_directed_acyclic_graph(quotient):
        cycle = nx.find_cycle(quotient)
        raise StageError("partition", f"regions would form a cycle: {cycle}")
