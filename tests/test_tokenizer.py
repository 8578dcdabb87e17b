"""The tokenizer wrapper over Mistral's official sentencepiece file (shipped by mistral-common)."""

from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path


def test_ids_past_the_vocabulary_have_no_text():
    """A model whose embedding is padded past the tokenizer (say 32,768 rows for 32,000
    tokens) can sample ids the tokenizer lacks: decoding leaves them out instead of raising."""
    tok = Tokenizer.load(default_tokenizer_path(32000))
    ids = tok.encode("Hello world", bos=False)
    assert tok.decode(ids) == "Hello world"
    assert tok.decode([*ids[:1], 32000, 40000, *ids[1:], -1]) == "Hello world"
    assert tok.piece(32000) == "" and tok.piece(ids[0]) != ""
