"""The byte-level tokenizer graphgen builds for models made from a config: id b is byte b
(0..255), then <bos>, <eos>, <pad>. Any UTF-8 text round-trips; no merges, no download."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259  # the smallest model vocab_size that covers every id


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with an empty merge list: the GPT-2 byte->unicode alphabet in byte order, so
    encoding is one token per UTF-8 byte and id == byte value. Adds <bos> in front when
    add_special_tokens is true (the default), like Llama's tokenizers."""
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    if [tok.token_to_id(t) for t in (BOS, EOS, PAD)] != [BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("byte tokenizer special ids moved; tokenizers changed how it numbers added tokens")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def save_byte_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Write tokenizer.json + tokenizer_config.json to `directory` (AutoTokenizer loads them)."""
    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
