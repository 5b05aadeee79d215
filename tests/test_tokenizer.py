import json

from transformers import AutoTokenizer

from kvtrain.data.corpus import load_documents
from kvtrain.data.tokenizer import train_bpe
from kvtrain.models import load_tokenizer


def test_bpe_training_is_deterministic(tmp_path):
    docs = load_documents(None, "val") + load_documents(None, "test")
    a, b = train_bpe(docs, vocab_size=600), train_bpe(list(docs), vocab_size=600)
    assert json.loads(a.backend_tokenizer.to_str()) == json.loads(b.backend_tokenizer.to_str())
    assert len(a) == 600


def test_embedded_tokenizer_loads_with_autotokenizer_and_round_trips(home):
    tok = load_tokenizer("kvtrain-ref")
    assert len(tok) == 4096
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]
    again = AutoTokenizer.from_pretrained(tok.name_or_path)
    text = 'def f(x):\n    return x ** 2  # café ∑ 🚀\n\t"""doc"""\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == again(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # Trained on Python: common keywords are single tokens.
    assert len(tok("def", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" return", add_special_tokens=False)["input_ids"]) == 1
