"""Shared fixtures: tiny randomly initialised causal LMs built in the test (no download)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from intra-op threads, and OpenMP spinning makes a loaded 2-core
# machine many times slower: one thread per test process.
torch.set_num_threads(1)


def make_tiny_lm(vocab_size=16, hidden=32, layers=2, heads=2, seed=0, max_positions=64):
    """A tiny Llama with random weights (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


@pytest.fixture
def tiny_lm():
    return make_tiny_lm()


def make_tiny_tokenizer(words=("a", "b", "c")):
    """A word-level tokenizer: <pad>=0, <s>=1, </s>=2, then ``words`` (whitespace-separated)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return tok


@pytest.fixture
def tiny_tok():
    return make_tiny_tokenizer()


def byte_tokenizer():
    """A byte-level tokenizer (every byte one token, no merges): '\\n' is a token, as in real BPEs."""
    from gfnlm.models import byte_level_tokenizer

    return byte_level_tokenizer()


def save_tiny_lm(path, tok, seed=0, max_positions=512):
    """A tiny random LM for ``tok`` saved with it as a local HF folder (what ``--model PATH`` loads)."""
    make_tiny_lm(vocab_size=len(tok), seed=seed, max_positions=max_positions).save_pretrained(path)
    tok.save_pretrained(path)
    return path
