"""Shared fixtures built from real artifacts: Mistral's own tokenizer and a tiny checkpoint of the real shape.

`mistral-common` ships Mistral's SentencePiece files (`tokenizer.model.v1`: the 32,000-token Mistral-7B-v0.1
vocabulary; `...model.v3`: 32,768 tokens). HF checkpoint folders carry the same vocabulary as `tokenizer.json`;
`tokenizer_json_from_sentencepiece` builds that file from the `.model` the way it is laid out on the Hub
(Prepend + Replace normalizer, no pre-tokenizer, byte-fallback BPE, BOS template, Strip decoder). The tests
compare it with sentencepiece itself, not with a converter. transformers, sentencepiece and mistral-common are
test-only dependencies (requirements-dev.txt); no script imports them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentencepiece_file(version: str = "v1") -> Path:
    import mistral_common
    data = Path(mistral_common.__file__).parent / "data"
    name = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}[version]
    return data / name


def tokenizer_json_from_sentencepiece(model_file: str | os.PathLike) -> str:
    """tokenizer.json text for a SentencePiece BPE model. SentencePiece merges the adjacent pair whose merged
    piece scores highest, so a merge's rank is its result's score (ties by the parts' ids)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    def bos(type_id: int) -> dict:
        return {"SpecialToken": {"id": "<s>", "type_id": type_id}}

    def seq(name: str, type_id: int) -> dict:
        return {"Sequence": {"id": name, "type_id": type_id}}

    merges = sorted((-sp.get_score(i), i, normal[p[:k]], normal[p[k:]], p[:k], p[k:])
                    for p, i in normal.items() for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [bos(0), seq("A", 0)],
                           "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)}, "merges": [[m[4], m[5]] for m in merges]},
    }, ensure_ascii=False)


# the tokenizer_config.json of the Hub's mistralai/Mistral-7B-v0.1 folder, abridged: no pad token
HUB_TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False,
                        "legacy": True, "model_max_length": 1000000000000000019884624838656,
                        "tokenizer_class": "LlamaTokenizer"}

# Mistral-7B-v0.1's shape, shrunk: same vocabulary, GQA (4 query heads on 2 KV heads), a sliding window
# shorter than the test sequences, rope_theta and norm eps as in its config.json
REAL_SHAPE = dict(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def real_mistral(tmp_path_factory) -> Path:
    """A checkpoint folder as a user downloads it: saved by transformers in bf16 in several shards, with
    Mistral's real 32,000-token tokenizer.json and no PAD token."""
    import torch
    import transformers
    d = tmp_path_factory.mktemp("real_mistral")
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(**REAL_SHAPE)
    hf = transformers.MistralForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # non-trivial norm weights, so norm order and dtype casts matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(d, max_shard_size="3MB")
    (d / "tokenizer.json").write_text(tokenizer_json_from_sentencepiece(sentencepiece_file("v1")), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(HUB_TOKENIZER_CONFIG))
    assert (d / "model.safetensors.index.json").is_file()
    return d
