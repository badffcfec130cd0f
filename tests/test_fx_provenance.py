"""The shared node provenance (targets/shared/fx_provenance.py) records what torch's deep copy records."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

CHECK = r"""
import sys, torch
from torch.fx import traceback as fx_traceback

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x)).softmax(-1)

if sys.argv[1] == "shared":
    from autoglm_export.targets.shared.fx_provenance import share_node_provenance
    assert share_node_provenance() and share_node_provenance()  # in force, idempotent
ep = torch.export.export(Block(), (torch.randn(2, 8),), strict=True).run_decompositions()
chains = [n.meta["from_node"] for n in ep.graph.nodes if n.meta.get("from_node")]
assert chains, "no provenance recorded"
node = next(n for n in ep.graph.nodes if n.meta.get("from_node"))
made = fx_traceback.NodeSource(node, "check", fx_traceback.NodeSourceAction.CREATE)
shared = all(a is b for a, b in zip(made.from_node, node.meta["from_node"]))
assert made.from_node is not node.meta["from_node"] and len(made.from_node) == len(node.meta["from_node"])
assert shared == (sys.argv[1] == "shared"), shared
print(repr([c.to_dict() for chain in chains for c in chain] + [made.to_dict()]))
"""


def _provenance(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", CHECK, mode], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_shared_provenance_records_the_same_chains_as_torchs_deep_copy():
    """Each process exports and decomposes the same module; the provenance chains (names, targets, pass
    names, actions, nested origins) are the same; only their sharing differs. graph_id is the id() of
    a graph, which differs between processes anyway, so it is left out of the comparison."""
    import re

    deep, shared = (re.sub(r"'graph_id': \d+", "'graph_id': 0", _provenance(m)) for m in ("deep", "shared"))
    assert deep == shared and "'from_node': [{" in deep  # nested chains were compared, not empty ones
