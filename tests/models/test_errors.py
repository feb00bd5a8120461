"""Every `raise` in models/ has a case here whose message is matched, and a guard that fails when
a new `raise` appears without one. Positive neighbours (the nearest valid value) sit alongside."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import models
from models import (
    ALiBiBias,
    DecoderLayer,
    DecoderLM,
    Encoder,
    EncoderLayer,
    FeedForward,
    LearnedPositionalEncoding,
    MultiHeadAttention,
    RotaryEmbedding,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativeBias,
    alibi_slopes,
    zoo,
)
from models._encodings import _ScoreBias
from models._kernels import attention as kernel_attention
from models._kernels import cached_attention
from models.zoo import InputSpec, UnknownEntryError

MODELS_DIR = Path(models.__file__).parent
D, H, HD = 32, 4, 8


def mha(**kw):
    return MultiHeadAttention(**{"embed_dim": D, "num_heads": H, **kw})


def lm(**kw):
    config = {
        "vocab_size": 11,
        "embed_dim": D,
        "num_heads": H,
        "num_kv_heads": 2,
        "ffn_dim": 16,
        "num_layers": 1,
    }
    return DecoderLM(**{**config, **kw})


def x(s: int = 3, d: int = D) -> torch.Tensor:
    return torch.zeros(1, s, d)


def kv(p: int = 2, h_kv: int = H) -> torch.Tensor:
    return torch.zeros(1, h_kv, p, HD)


def qkv(s: int = 3) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(1, s, H, HD) for _ in range(3))  # [b, s, h, h_d] each


def bare_score_bias():
    return _ScoreBias().score_bias(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def bare_value_term():
    return _ScoreBias().value_term(torch.zeros(1, 1, 1, 1))


def odd_input_kind():
    entry = dataclasses.replace(zoo.get("mha_self"), inputs=(InputSpec("z", (2,), "weird"),))
    return entry.make_inputs({})


# site: "module:function:message skeleton" as `raise_sites` below derives it from the source
# ({} marks a formatted value). Each case: (site, call, message pattern); the exception is
# ValueError unless EXCEPTIONS says otherwise.
A, E, K, L, Z = "_attention", "_encodings", "_kernels", "_layers", "zoo"
POSITIVE = "{} ({}) must be positive"
KERNEL_CAUSAL_ONLY = "the attention kernel takes a window only when causal"
CASES = {
    # --- encodings
    "sinusoid-dim-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: SinusoidalPositionalEncoding(dim=0),
        r"dim \(0\) must be positive",
    ),
    "learned-max-len-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: LearnedPositionalEncoding(dim=4, max_len=0),
        r"max_len \(0\) must be positive",
    ),
    "alibi-heads-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: alibi_slopes(0),
        r"num_heads \(0\) must be positive",
    ),
    "alibi-module-heads-neg": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: ALiBiBias(num_heads=-2),
        r"num_heads \(-2\) must be",
    ),
    "t5-heads-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: T5RelativeBias(num_heads=0),
        r"num_heads \(0\) must be positive",
    ),
    "t5-max-distance-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: T5RelativeBias(num_heads=2, max_distance=0),
        r"max_distance \(0\) must be positive",
    ),
    "shaw-k-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: ShawRelativePosition(head_dim=HD, max_distance=0),
        r"max_distance \(0\) must be positive",
    ),
    "shaw-head-dim-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: ShawRelativePosition(head_dim=0, max_distance=2),
        r"head_dim \(0\) must be positive",
    ),
    "xl-heads-0": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: TransformerXLRelativeBias(num_heads=0, head_dim=HD),
        r"num_heads \(0\) must be positive",
    ),
    "rope-head-dim-neg": (
        f"{E}:_check_positive:{POSITIVE}",
        lambda: RotaryEmbedding(head_dim=-4),
        r"head_dim \(-4\) must be",
    ),
    "sinusoid-odd": (
        f"{E}:SinusoidalPositionalEncoding.__init__:dim ({{}}) must be even for "
        "sinusoidal encodings",
        lambda: SinusoidalPositionalEncoding(dim=5),
        r"dim \(5\) must be even",
    ),
    "rope-seq-dim-3": (
        f"{E}:RotaryEmbedding.forward:seq_dim ({{}}) must be 1 ([b, s, h, h_d]) or 2 "
        "([b, h, s, h_d])",
        lambda: RotaryEmbedding(head_dim=HD)(torch.zeros(1, 2, 3, HD), seq_dim=3),
        r"seq_dim \(3\) must be 1 \(\[b, s, h, h_d\]\) or 2",
    ),
    "kernel-cached-outside-routing": (
        f"{K}:cached_attention:cached_attention is a kernel op: call it inside ort_kernels()",
        lambda: cached_attention(*qkv(), torch.zeros(1, H, 2, HD), torch.zeros(1, H, 2, HD)),
        r"cached_attention is a kernel op: call it inside ort_kernels\(\)",
    ),
    "kernel-window-not-causal": (
        f"{K}:attention:{KERNEL_CAUSAL_ONLY}",
        lambda: kernel_attention(*qkv(), window=2),
        r"takes a window only when causal",
    ),
    "rope-odd": (
        f"{E}:RotaryEmbedding.__init__:head_dim ({{}}) must be even for rotary embeddings",
        lambda: RotaryEmbedding(head_dim=7),
        r"head_dim \(7\) must be even",
    ),
    "learned-overflow": (
        f"{E}:LearnedPositionalEncoding.forward:positions up to {{}} exceed the "
        "learned table's max_len ({})",
        lambda: LearnedPositionalEncoding(dim=4, max_len=2)(x(3, 4)),
        r"positions up to 3 exceed the learned table's max_len \(2\)",
    ),
    "t5-too-few-buckets-bi": (
        f"{E}:T5RelativeBias.__init__:num_buckets ({{}}) must be at least "
        "{} (bidirectional={})",
        lambda: T5RelativeBias(num_heads=2, num_buckets=3),
        r"num_buckets \(3\) must be at least 4 \(bidirectional=True\)",
    ),
    "t5-too-few-buckets-causal": (
        f"{E}:T5RelativeBias.__init__:num_buckets ({{}}) must be at "
        "least {} (bidirectional={})",
        lambda: T5RelativeBias(num_heads=2, num_buckets=1, bidirectional=False),
        r"num_buckets \(1\) must be at least 2 \(bidirectional=False\)",
    ),
    "t5-max-distance-in-exact-bi": (
        f"{E}:T5RelativeBias.__init__:max_distance ({{}}) must exceed the exact range ({{}})",
        lambda: T5RelativeBias(num_heads=2, num_buckets=16, max_distance=4),
        r"max_distance \(4\) must exceed the exact range \(4\)",
    ),
    "t5-max-distance-in-exact-causal": (
        f"{E}:T5RelativeBias.__init__:max_distance ({{}}) must exceed the exact range ({{}})",
        lambda: T5RelativeBias(num_heads=2, num_buckets=16, max_distance=8, bidirectional=False),
        r"max_distance \(8\) must exceed the exact range \(8\)",
    ),
    "score-bias-abstract": (f"{E}:_ScoreBias.score_bias:", bare_score_bias, None),
    "value-term-abstract": (f"{E}:_ScoreBias.value_term:", bare_value_term, None),
    # --- attention
    "embed-dim-0": (
        f"{A}:_check_heads:{POSITIVE}",
        lambda: mha(embed_dim=0),
        r"embed_dim \(0\) must be positive",
    ),
    "heads-0": (
        f"{A}:_check_heads:{POSITIVE}",
        lambda: mha(num_heads=0),
        r"num_heads \(0\) must be positive",
    ),
    "kv-heads-0": (
        f"{A}:_check_heads:num_kv_heads ({{}}) must be positive",
        lambda: mha(num_kv_heads=0),
        r"num_kv_heads \(0\) must be positive",
    ),
    "embed-not-divisible": (
        f"{A}:_check_heads:embed_dim ({{}}) must be divisible by num_heads ({{}})",
        lambda: mha(embed_dim=30),
        r"embed_dim \(30\) must be divisible by num_heads \(4\)",
    ),
    "heads-not-divisible": (
        f"{A}:_check_heads:num_heads ({{}}) must be divisible by num_kv_heads ({{}})",
        lambda: mha(num_kv_heads=3),
        r"num_heads \(4\) must be divisible by num_kv_heads \(3\)",
    ),
    "kv-heads-above-heads": (
        f"{A}:_check_heads:num_heads ({{}}) must be divisible by num_kv_heads ({{}})",
        lambda: mha(num_kv_heads=8),
        r"num_heads \(4\) must be divisible by num_kv_heads \(8\)",
    ),
    "window-0": (
        f"{A}:MultiHeadAttention.__init__:window ({{}}) must be positive",
        lambda: mha(window=0),
        r"window \(0\) must be positive",
    ),
    "window-neg": (
        f"{A}:MultiHeadAttention.__init__:window ({{}}) must be positive",
        lambda: mha(window=-2, causal=True),
        r"window \(-2\) must be positive",
    ),
    "cross-causal": (
        f"{A}:MultiHeadAttention.__init__:cross attention takes no causal mask, "
        "window or positional encoding (got causal={}, window={}, "
        "pos_embeddings={})",
        lambda: mha(cross_attention=True, causal=True),
        r"cross attention takes no causal.*causal=True, window=None",
    ),
    "cross-window": (
        f"{A}:MultiHeadAttention.__init__:cross attention takes no causal mask, "
        "window or positional encoding (got causal={}, window={}, "
        "pos_embeddings={})",
        lambda: mha(cross_attention=True, window=3),
        r"cross attention takes no causal.*window=3",
    ),
    "cross-pos": (
        f"{A}:MultiHeadAttention.__init__:cross attention takes no causal mask, "
        "window or positional encoding (got causal={}, window={}, pos_embeddings={})",
        lambda: mha(cross_attention=True, pos_embeddings=ALiBiBias(num_heads=H)),
        r"pos_embeddings=ALiBiBias\)",
    ),
    "pos-bad-type": (
        f"{A}:MultiHeadAttention.__init__:pos_embeddings ({{}}) must be a "
        "RotaryEmbedding or a score-bias encoding",
        lambda: mha(pos_embeddings=torch.nn.Linear(2, 2)),
        r"pos_embeddings \(Linear\) must be a RotaryEmbedding",
    ),
    "pos-absolute-encoding": (
        f"{A}:MultiHeadAttention.__init__:pos_embeddings ({{}}) must be a "
        "RotaryEmbedding or a score-bias encoding",
        lambda: mha(pos_embeddings=SinusoidalPositionalEncoding(dim=D)),
        r"pos_embeddings \(SinusoidalPositionalEncoding\) must be",
    ),
    "kv-dim-0": (
        f"{A}:MultiHeadAttention.__init__:kv_dim ({{}}) must be positive",
        lambda: mha(kv_dim=0, cross_attention=True),
        r"kv_dim \(0\) must be positive",
    ),
    "kv-dim-self": (
        f"{A}:MultiHeadAttention.__init__:kv_dim ({{}}) differs from embed_dim ({{}})"
        ", but self attention reads its keys and values from x; build with "
        "cross_attention=True",
        lambda: mha(kv_dim=48),
        r"kv_dim \(48\) differs from embed_dim \(32\)",
    ),
    "rope-wrong-head-dim": (
        f"{A}:_check_pos_embeddings:pos_embeddings ({{}}) was built for "
        "{}, but the attention has {}",
        lambda: mha(pos_embeddings=RotaryEmbedding(head_dim=6)),
        r"RotaryEmbedding\) was built for \{'head_dim': 6\}, but the "
        r"attention has \{'head_dim': 8\}",
    ),
    "alibi-wrong-heads": (
        f"{A}:_check_pos_embeddings:pos_embeddings ({{}}) was built for "
        "{}, but the attention has {}",
        lambda: mha(pos_embeddings=ALiBiBias(num_heads=3)),
        r"ALiBiBias\) was built for \{'num_heads': 3\}",
    ),
    "t5-wrong-heads": (
        f"{A}:_check_pos_embeddings:pos_embeddings ({{}}) was built for "
        "{}, but the attention has {}",
        lambda: mha(pos_embeddings=T5RelativeBias(num_heads=2)),
        r"T5RelativeBias\) was built for \{'num_heads': 2\}",
    ),
    "shaw-wrong-head-dim": (
        f"{A}:_check_pos_embeddings:pos_embeddings ({{}}) was built for "
        "{}, but the attention has {}",
        lambda: mha(pos_embeddings=ShawRelativePosition(head_dim=4, max_distance=2)),
        r"ShawRelativePosition\) was built for \{'head_dim': 4\}",
    ),
    "xl-wrong-shape": (
        f"{A}:_check_pos_embeddings:pos_embeddings ({{}}) was built for "
        "{}, but the attention has {}",
        lambda: mha(pos_embeddings=TransformerXLRelativeBias(num_heads=2, head_dim=16)),
        r"built for \{'num_heads': 2, 'head_dim': 16\}, but the attention has "
        r"\{'num_heads': 4, 'head_dim': 8\}",
    ),
    "cross-no-context": (
        f"{A}:MultiHeadAttention._source:cross attention needs a context tensor",
        lambda: mha(cross_attention=True)(x()),
        r"cross attention needs a context tensor",
    ),
    "cross-past-key": (
        f"{A}:MultiHeadAttention._source:cross attention takes no KV cache; pass "
        "the context instead",
        lambda: mha(cross_attention=True)(x(), x(), past_key=kv(), past_value=kv()),
        r"cross attention takes no KV cache",
    ),
    "cross-past-value-only": (
        f"{A}:MultiHeadAttention._source:cross attention takes no KV "
        "cache; pass the context instead",
        lambda: mha(cross_attention=True)(x(), x(), past_value=kv()),
        r"cross attention takes no KV cache",
    ),
    "self-with-context": (
        f"{A}:MultiHeadAttention._source:self attention takes no context; "
        "build with cross_attention=True",
        lambda: mha()(x(), x()),
        r"self attention takes no context",
    ),
    "past-key-only": (
        f"{A}:MultiHeadAttention._source:past_key and past_value must be given together",
        lambda: mha(causal=True)(x(), past_key=kv()),
        r"past_key and past_value must be given together",
    ),
    "past-value-only": (
        f"{A}:MultiHeadAttention._source:past_key and past_value must be given together",
        lambda: mha(causal=True)(x(), past_value=kv()),
        r"past_key and past_value must be given together",
    ),
    # --- layers
    "ffn-dim-0": (
        f"{L}:FeedForward.__init__:{POSITIVE}",
        lambda: FeedForward(embed_dim=D, ffn_dim=0),
        r"ffn_dim \(0\) must be positive",
    ),
    "ffn-embed-dim-neg": (
        f"{L}:FeedForward.__init__:{POSITIVE}",
        lambda: FeedForward(embed_dim=-1, ffn_dim=4),
        r"embed_dim \(-1\) must be positive",
    ),
    "encoder-layer-ffn-0": (
        f"{L}:FeedForward.__init__:{POSITIVE}",
        lambda: EncoderLayer(embed_dim=D, num_heads=H, ffn_dim=0),
        r"ffn_dim \(0\) must be positive",
    ),
    "decoder-context-missing": (
        f"{L}:DecoderLayer.forward:context must be given exactly when "
        "the layer has cross attention (cross_attention={}, context "
        "given={})",
        lambda: DecoderLayer(embed_dim=D, num_heads=H, ffn_dim=8, cross_attention=True)(x()),
        r"cross_attention=True, context given=False",
    ),
    "decoder-context-unexpected": (
        f"{L}:DecoderLayer.forward:context must be given exactly when"
        " the layer has cross attention (cross_attention={}, context "
        "given={})",
        lambda: DecoderLayer(embed_dim=D, num_heads=H, ffn_dim=8)(x(), x()),
        r"cross_attention=False, context given=True",
    ),
    "encoder-vocab-0": (
        f"{L}:Encoder.__init__:{POSITIVE}",
        lambda: Encoder(vocab_size=0, embed_dim=D, num_heads=H, ffn_dim=8, num_layers=1),
        r"vocab_size \(0\) must be positive",
    ),
    "encoder-layers-0": (
        f"{L}:Encoder.__init__:{POSITIVE}",
        lambda: Encoder(vocab_size=5, embed_dim=D, num_heads=H, ffn_dim=8, num_layers=0),
        r"num_layers \(0\) must be positive",
    ),
    "lm-vocab-0": (
        f"{L}:DecoderLM.__init__:{POSITIVE}",
        lambda: lm(vocab_size=0),
        r"vocab_size \(0\) must be positive",
    ),
    "lm-layers-neg": (
        f"{L}:DecoderLM.__init__:{POSITIVE}",
        lambda: lm(num_layers=-1),
        r"num_layers \(-1\) must be positive",
    ),
    "lm-heads-0": (
        f"{A}:_check_heads:{POSITIVE}",
        lambda: lm(num_heads=0),
        r"num_heads \(0\) must be positive",
    ),
    "lm-embed-not-divisible": (
        f"{A}:_check_heads:embed_dim ({{}}) must be divisible by num_heads ({{}})",
        lambda: lm(embed_dim=30),
        r"embed_dim \(30\) must be divisible by num_heads \(4\)",
    ),
    "lm-past-keys-only": (
        f"{L}:DecoderLM.forward:past_keys and past_values must be given together",
        lambda: lm()(torch.zeros(1, 1, dtype=torch.long), past_keys=torch.zeros(1, 1, 2, 1, HD)),
        r"past_keys and past_values must be given together",
    ),
    # --- zoo
    "zoo-point-lacks-dims": (
        f"{Z}:ZooEntry.make_inputs:point {{}} lacks dims {{}} of entry '{{}}'",
        lambda: zoo.get("kv_cache").make_inputs({"batch": 1, "seq": 2}),
        r"point \{'batch': 1, 'seq': 2\} lacks dims \['past'\] of entry "
        r"'kv_cache'",
    ),
    "zoo-unknown-input-kind": (
        f"{Z}:_make_input:unknown input kind '{{}}' for input '{{}}'",
        odd_input_kind,
        r"unknown input kind 'weird' for input 'z'",
    ),
    "zoo-unknown-encoding": (
        f"{Z}:_positional:unknown positional encoding '{{}}'",
        lambda: zoo.get("mha_self").build(pos="bogus"),
        r"unknown positional encoding 'bogus'",
    ),
    "zoo-unknown-name": (
        f"{Z}:get:unknown zoo entry '{{}}'; known entries: {{}}",
        lambda: zoo.get("no_such_entry"),
        r"unknown zoo entry 'no_such_entry'; known entries: sinusoidal_pe, ",
    ),
}
EXCEPTIONS = {
    "zoo-unknown-name": UnknownEntryError,
    "score-bias-abstract": NotImplementedError,
    "value-term-abstract": NotImplementedError,
    "kernel-cached-outside-routing": RuntimeError,
}


@pytest.mark.parametrize("case", CASES)
def test_raises_with_message(case):
    _, call, pattern = CASES[case]
    with pytest.raises(EXCEPTIONS.get(case, ValueError), match=pattern):
        call()


# Nearest valid neighbours of the cases above: the same constructors and calls succeed.
VALID = {
    "sinusoid-dim-2": lambda: SinusoidalPositionalEncoding(dim=2),
    "rope-head-dim-2": lambda: RotaryEmbedding(head_dim=2),
    "learned-exactly-max-len": lambda: LearnedPositionalEncoding(dim=4, max_len=3)(x(3, 4)),
    "alibi-heads-1": lambda: alibi_slopes(1),
    "t5-minimal-bi": lambda: T5RelativeBias(num_heads=2, num_buckets=4, max_distance=2),
    "t5-minimal-causal": lambda: T5RelativeBias(
        num_heads=2, num_buckets=2, max_distance=2, bidirectional=False
    ),
    "t5-max-distance-just-above": lambda: T5RelativeBias(
        num_heads=2, num_buckets=16, max_distance=5
    ),
    "shaw-k-1": lambda: ShawRelativePosition(head_dim=HD, max_distance=1),
    "window-1": lambda: mha(window=1)(x()),
    "mqa": lambda: mha(num_kv_heads=1)(x()),
    "kv-heads-equal-heads": lambda: mha(num_kv_heads=H)(x()),
    "cross-kv-dim-48": lambda: mha(cross_attention=True, kv_dim=48)(x(), x(5, 48)),
    "self-kv-dim-equal": lambda: mha(kv_dim=D)(x()),
    "matching-encodings": lambda: [
        mha(pos_embeddings=p)(x())
        for p in (
            RotaryEmbedding(head_dim=HD),
            ALiBiBias(num_heads=H),
            T5RelativeBias(num_heads=H),
            ShawRelativePosition(head_dim=HD, max_distance=2),
            TransformerXLRelativeBias(num_heads=H, head_dim=HD),
        )
    ],
    "xl-with-gqa": lambda: mha(
        num_kv_heads=2, pos_embeddings=TransformerXLRelativeBias(num_heads=H, head_dim=HD)
    )(x()),
    "past-pair": lambda: mha(causal=True)(x(), past_key=kv(), past_value=kv()),
    "cross-use-cache": lambda: mha(cross_attention=True)(x(), x(4), use_cache=True),
    "decoder-context-given": lambda: DecoderLayer(
        embed_dim=D, num_heads=H, ffn_dim=8, cross_attention=True
    )(x(), x(5)),
    "lm-kv-heads-none": lambda: lm(num_kv_heads=None),
    "lm-past-pair": lambda: lm()(
        torch.zeros(1, 1, dtype=torch.long),
        torch.zeros(1, 1, 2, 1, HD),
        torch.zeros(1, 1, 2, 1, HD),
    ),
    "zoo-point-complete": lambda: zoo.get("kv_cache").make_inputs(
        {"batch": 1, "seq": 2, "past": 0}
    ),
    "zoo-encoding-override": lambda: zoo.get("mha_self").build(pos="alibi"),
}


@pytest.mark.parametrize("call", VALID.values(), ids=VALID.keys())
def test_valid_neighbours_do_not_raise(call):
    call()


def test_unknown_zoo_name_lists_every_known_name():
    with pytest.raises(UnknownEntryError) as info:
        zoo.get("mha_selff")
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    for name in zoo.names():
        assert f"{name}" in message
    assert message.endswith(", ".join(zoo.names()))


# --- the guard: every raise in models/ has a case -----------------------------------------------


def _skeleton(call: ast.expr | None) -> str:
    """The literal text of a raise's first argument, with {} where values are formatted."""
    if not isinstance(call, ast.Call) or not call.args:
        return ""
    arg = call.args[0]
    if isinstance(arg, ast.Constant):
        return str(arg.value)
    if isinstance(arg, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
    return ast.unparse(arg)


def raise_sites() -> set[str]:
    """'module:qualified function:message skeleton' for every raise statement in models/."""
    sites = set()
    for path in sorted(MODELS_DIR.glob("*.py")):

        def visit(node, qual, stem=path.stem):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    visit(child, (*qual, child.name))
                    continue
                if isinstance(child, ast.Raise) and child.exc is not None:
                    sites.add(f"{stem}:{'.'.join(qual)}:{_skeleton(child.exc)}")
                visit(child, qual)

        visit(ast.parse(path.read_text()), ())
    return sites


def test_every_raise_in_models_has_a_case():
    sites = raise_sites()
    assert len(sites) >= 25  # the scan itself works
    covered = {site for site, _, _ in CASES.values()}
    assert sites - covered == set(), "raise statements without a test case"
    assert covered - sites == set(), "cases naming a raise that no longer exists"
