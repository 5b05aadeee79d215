"""The embedded tokenizer: a byte-level BPE trained on the train split of the stdlib corpus.

Saved as a `transformers.PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(path)` loads
it like any hub tokenizer. Training is deterministic: same documents, same vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvtrain.data.corpus import load_documents
from kvtrain.home import cached_entry

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_VOCAB_SIZE = 4096


def train_bpe(documents: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def build_tokenizer(out_dir: Path, source: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    print(f"kvtrain: training a {vocab_size}-token byte-level BPE on the train split", file=sys.stderr)
    train_bpe(load_documents(source, "train"), vocab_size).save_pretrained(str(out_dir))
    return out_dir


def embedded_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Path of the cached stdlib tokenizer, built on first use."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return cached_entry(f"tokenizers/stdlib-{tag}-bpe{vocab_size}", lambda d: build_tokenizer(d, None, vocab_size))

