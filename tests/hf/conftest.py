"""Tiny random-weight Hugging Face models of each family, built from configs (no hub), and their
bundles exported once per session with the default grid and every variant.

BertModel (padding masks, token types), GPT2Model / GPT2LMHeadModel (learned positions),
LlamaModel / LlamaForCausalLM (RoPE, grouped-query attention), T5EncoderModel (relative position
buckets). Each export takes 10-25 s on 2 cores. Without the [hf] extra every test module here
skips (each calls pytest.importorskip("transformers") first).
"""

from __future__ import annotations

import importlib

import pytest
import torch

VOCAB = 99


def _transformers():
    return importlib.import_module("transformers")


POSITIONS = 64


def _bert():
    config = _transformers().BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=POSITIONS,
    )
    return _transformers().BertModel(config)


def _gpt2_config():
    return _transformers().GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
    )


def _llama_config():
    return _transformers().LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=POSITIONS,
    )


def _t5_encoder():
    config = _transformers().T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4
    )
    return _transformers().T5EncoderModel(config)


BUILDERS = {
    "bert": _bert,
    "gpt2": lambda: _transformers().GPT2Model(_gpt2_config()),
    "gpt2_lm": lambda: _transformers().GPT2LMHeadModel(_gpt2_config()),
    "llama": lambda: _transformers().LlamaModel(_llama_config()),
    "llama_lm": lambda: _transformers().LlamaForCausalLM(_llama_config()),
    "t5_encoder": _t5_encoder,
}
CAUSAL = {"gpt2", "gpt2_lm", "llama", "llama_lm"}


def build(family: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BUILDERS[family]().eval()


@pytest.fixture(scope="session")
def hf_models():
    return {family: build(family) for family in BUILDERS}


@pytest.fixture(scope="session")
def hf_exports(hf_models, tmp_path_factory):
    """family -> ExportResult of export_module(model) with the default grid, written out."""
    from export import export_module

    out = tmp_path_factory.mktemp("hf_bundles")
    return {family: export_module(m, out=out, name=family) for family, m in hf_models.items()}
