"""attnx blocks: positional encodings, attention and layers (torch only).

Shape legend: b batch, s query length, s_kv key/value length, p past (cached) length, d model
dim, h query heads, h_kv key/value heads, h_d head dim, L layers, V vocabulary.
"""

from models._attention import (
    MultiHeadAttention,
    ScaledDotProductAttention,
    scaled_dot_product_attention,
)
from models._encodings import (
    ALiBiBias,
    LearnedPositionalEncoding,
    RotaryEmbedding,
    ShawRelativePosition,
    SinusoidalPositionalEncoding,
    T5RelativeBias,
    TransformerXLRelativeBias,
    alibi_slopes,
    relative_distances,
    t5_bucket,
)
from models._layers import DecoderLayer, DecoderLM, Encoder, EncoderLayer, FeedForward

__all__ = [
    "ALiBiBias",
    "DecoderLM",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "LearnedPositionalEncoding",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "ScaledDotProductAttention",
    "ShawRelativePosition",
    "SinusoidalPositionalEncoding",
    "T5RelativeBias",
    "TransformerXLRelativeBias",
    "alibi_slopes",
    "relative_distances",
    "scaled_dot_product_attention",
    "t5_bucket",
]
