"""A real Hugging Face fast tokenizer in milliseconds: one token per byte, plus EOS.

Grammar backends bridge to it as they do to a real model's tokenizer, so engine and serving
tests of structured outputs need no model download or GGUF conversion.
"""

from __future__ import annotations

from loom.tokenizer import HFTokenizer

EOS = 0


def byte_tokenizer() -> HFTokenizer:
    """One token per byte (GPT-2's byte alphabet, no merges) and EOS "</s>" as id 0: 257 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": EOS}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>"))
