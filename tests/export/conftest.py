import json

import onnx
import pytest

from export._cli import main
from export.rewrites.head_groups import subgraphs
from models import zoo


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """`attnx export --all` run once for the session, exactly as the README's main job does.

    Returns (exit code, {name: bundle folder}, parity records as JSON dicts)."""
    out = tmp_path_factory.mktemp("artifacts")
    records = out.parent / "records.json"
    code = main(["export", "--all", "--out", str(out), "--json", str(records)])
    bundles = {name: out / name for name in zoo.names()}
    return code, bundles, json.loads(records.read_text())


@pytest.fixture(scope="session")
def zoo_bundles(zoo_export):
    return zoo_export[1]


def kernel_nodes(graph: onnx.GraphProto, op_type: str):
    """Every node of op_type in graph and in its subgraphs (Loop bodies, If branches)."""
    for node in graph.node:
        if node.op_type == op_type:
            yield node
        for sub in subgraphs(node):
            yield from kernel_nodes(sub, op_type)


def assert_gqa_keeps_present(bundle) -> int:
    """onnxruntime 1.32's CPU GroupQueryAttention takes its flash path, which stops each query
    block at the diagonal, only when its present key/value outputs exist; without them it
    scores the prompt on its slower path. Returns how many kernels were checked."""
    checked = 0
    for path in sorted(bundle.glob("*.onnx")):
        for node in kernel_nodes(onnx.load(path).graph, "GroupQueryAttention"):
            assert len(node.output) == 3 and all(node.output), (path.name, list(node.output))
            checked += 1
    return checked
