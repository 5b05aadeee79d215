import torch

from kvtrain.data.lm import PackedDataset, ResumableRandomSampler, token_stream, tokenize_documents
from kvtrain.models import load_tokenizer


def test_tokenize_documents_puts_eos_after_each():
    tok = load_tokenizer("kvtrain-ref")
    stream = tokenize_documents(["a = 1", "b = 2"], tok)
    a = tok("a = 1", add_special_tokens=False)["input_ids"]
    b = tok("b = 2", add_special_tokens=False)["input_ids"]
    assert stream.tolist() == a + [tok.eos_token_id] + b + [tok.eos_token_id]
    assert stream.dtype == torch.int32


def test_packing_windows_tile_the_stream_and_drop_the_tail():
    tokens = torch.arange(23, dtype=torch.int32)
    ds = PackedDataset(tokens, seq_len=5)
    assert len(ds) == 4
    assert ds[0]["input_ids"].tolist() == [0, 1, 2, 3, 4]
    assert ds[3]["input_ids"].tolist() == [15, 16, 17, 18, 19]
    assert ds[3]["attention_mask"].tolist() == [1] * 5
    assert torch.cat([ds[i]["input_ids"] for i in range(4)]).tolist() == list(range(20))


def test_packing_rejects_too_short_stream():
    import pytest

    with pytest.raises(ValueError, match="fewer than one window"):
        PackedDataset(torch.arange(3), seq_len=8)


def test_token_stream_is_cached_and_stable(corpus_file, home):
    tok = load_tokenizer("kvtrain-ref")
    first = token_stream(str(corpus_file), "val", tok)
    cached = sorted((home / "datasets").glob("*-val"))
    assert cached, "token stream was not cached"
    assert torch.equal(first, token_stream(str(corpus_file), "val", tok))


def test_resumable_sampler_order_depends_only_on_seed_and_epoch():
    s = ResumableRandomSampler(10, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(10)) and e0 != e1
    s2 = ResumableRandomSampler(10, seed=3)
    s2.skip_once(epoch=1, samples=4)
    s2.set_epoch(0)
    assert list(s2) == e0  # the skip only applies to its epoch
    s2.set_epoch(1)
    assert list(s2) == e1[4:]
    assert list(s2) == e1  # and only once
