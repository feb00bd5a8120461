"""The kernel lowerings and ONNX graph rewrites behind the optimized variants (private).

Each one has the shape of an onnxscript rewriter rule: it finds candidates (pattern), checks
each candidate and says in plain language why it rejects one (check), and replaces what passed
(replace). A rewrite never changes a graph it rejects.

Graph rewrites, run on an exported ModelProto (onnx only, no torch):
- ``head_groups``: causal self-attention over head groups in an ONNX Loop, for long sequences
  (the ``fused`` and ``int8`` variants). Pattern: com.microsoft.GroupQueryAttention nodes.
  Check: the heads divide into the groups, no past key/value input, present key/value outputs
  unused, q, k and v MatMul (+ bias Add) projections of one input with constant weights of
  heads * head_dim columns, and a rewritten graph that reads nothing undefined. Replace: an If
  that takes the Loop from ``min_seq`` tokens on and keeps the one-call kernel below.
- ``batch_rows``: cached GroupQueryAttention for every batch, step and past length (``fused``).
  Pattern: GroupQueryAttention nodes. Check: the node has a past key/value input. Replace: an
  If between one kernel call (one row or one token) and a Loop over the batch rows.

- ``shared_kv``: grouped-query attention without repeating kv heads over the cache
  (``attention23``). Pattern: ai.onnx Attention nodes. Check: k and v are repeat_kv's
  Unsqueeze(axis 2) -> Expand -> Reshape of a [b, h_kv, s_kv, h_d] tensor into [b, h, s_kv, h_d]
  (same b, s_kv, h_d by the inferred shapes; static heads, h a multiple of h_kv) read only by
  Attention. Replace: Attention reads the tensor before the repeat.

- ``layer_norms``: SkipLayerNormalization back into Add and LayerNormalization (``fused``),
  which onnxruntime's CPU kernels run 4.5x faster. Pattern: com.microsoft
  SkipLayerNormalization nodes. Check: nothing reads their mean / inv_std_var outputs.
  Replace: Add (+ the bias Add) and LayerNormalization with the node's epsilon.

``group_heads_result``, ``rows_result``, ``share_kv_result`` and ``unfuse_result`` return a
RewriteResult: the model, the names of the nodes replaced, and every rejected candidate with
its reason (also logged at DEBUG on each module's logger). ``group_heads``,
``rows_for_cached_prompts``, ``share_kv_heads`` and ``unfuse_skip_layer_norms`` return the
model alone.

Kernel lowerings, onnxscript translations of attnx's custom torch ops that torch.onnx.export
calls (torch + onnxscript):
- ``kernels``: attnx::attention and attnx::cached_attention to onnxruntime's contrib kernels
  (GroupQueryAttention when causal, MultiHeadAttention otherwise) for the ``fused`` variant;
- ``native``: a causal sliding window to the native ONNX Attention-25 op (``attention23``).
Their candidates are the op calls that models/_kernels.py and models/_native.py route to them;
the check raises ValueError naming what the kernel cannot take (dynamic head counts, a
window without causal, a score bias on the native path); the replacement is the emitted ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class Rejected:
    """A candidate node a rewrite left as it was, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class RewriteResult:
    """What a graph rewrite did: ``model`` is the rewritten copy, or the input model itself
    when nothing was replaced."""

    model: onnx.ModelProto
    rewritten: tuple[str, ...] = ()
    rejected: tuple[Rejected, ...] = ()


def node_attrs(node: onnx.NodeProto) -> dict:
    """The node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or op type and position in its graph when it has none."""
    return node.name or f"{node.op_type} #{index}"
