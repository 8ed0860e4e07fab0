"""Tokens shown on their own: visible control characters, and characters split over byte-level tokens."""

from conftest import build_tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.token_text import token_bytes, token_texts


def test_control_characters_are_drawn_visibly():
    tokenizer = build_tiny_tokenizer()
    for text, shown in (("a\r\nb\tc", "a␍⏎b→c"), ("x\ry", "x␍y"), ("\x1b[2J\x7f", "␛[2J␡")):
        texts = token_texts(tokenizer, tokenizer.encode(text))
        assert "".join(texts) == shown and all(texts)  # no token blank


def test_a_carriage_return_and_line_feed_in_one_token_shows_both():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE({**{char: i for i, char in enumerate(alphabet)}, "čĊ": len(alphabet)}, [("č", "Ċ")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)  # as Qwen's, it has one token for "\r\n"
    ids = tokenizer.encode("x\r\ny\n")
    assert token_texts(tokenizer, ids) == ["x", "␍⏎", "y", "⏎"]  # a Windows line end is told from a Unix one


def test_every_invisible_character_is_an_escape_and_spaces_stay():
    tokenizer = build_tiny_tokenizer()
    hidden = "\u0085\u00ad\u061c\u200b\u202e\u2028\U000e0069"  # C1 control, soft hyphen, bidi marks, zero width, tag
    texts = token_texts(tokenizer, tokenizer.encode(f"k{hidden}\u00a0\u3000v"))
    shown = "".join(text for text in texts if not text.startswith("\\x"))  # without the first bytes of split characters
    assert shown == "k\\u0085\\u00ad\\u061c\\u200b\\u202e\\u2028\\U000e0069\u00a0\u3000v"


def test_a_character_split_over_tokens_is_shown_on_the_token_that_ends_it():
    tokenizer = build_tiny_tokenizer()  # knows no merges of non-ASCII bytes: each such byte is a token
    ids = tokenizer.encode("x = '🦜é'  # ok")
    texts = token_texts(tokenizer, ids)
    parrot = texts.index("🦜")
    assert texts[parrot - 3 : parrot + 3] == ["\\xf0", "\\x9f", "\\xa6", "🦜", "\\xc3", "é"]
    assert "".join(texts).replace("\\xf0\\x9f\\xa6", "").replace("\\xc3", "") == "x = '🦜é'  # ok"
    assert b"".join(token_bytes(tokenizer, ids)) == "x = '🦜é'  # ok".encode()

    assert token_texts(tokenizer, ids[parrot - 2 :])[:5] == ["\\x9f", "\\xa6", "\\x9c", "\\xc3", "é"]  # a window begun inside it
    assert token_texts(tokenizer, ids[:parrot])[-3:] == ["\\xf0", "\\x9f", "\\xa6"]  # one that ends inside it


def test_special_tokens_keep_their_text():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.encode("<|im_start|>user\n中<|im_end|>")
    texts = token_texts(tokenizer, ids)
    assert texts[0] == "<|im_start|>" and texts[-1] == "<|im_end|>" and "中" in texts


def test_tokenizers_that_are_not_byte_level_decode_each_token_on_its_own():
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "f": 2, "é": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert token_bytes(tokenizer, [1, 2]) is None
    assert token_texts(tokenizer, [1, 3, 0]) == ["def", "é", "[UNK]"]
    assert token_texts(None, [5, 7]) == ["[5]", "[7]"]


def test_invisible_and_terminal_active_characters_are_shown_as_escapes():
    """A bidi override would reverse the rest of a context, a C1 CSI start a terminal escape sequence."""
    tokenizer = build_tiny_tokenizer()
    text = "x = 1 \u202e# note\x9b31m\u2028y\u200bz\u2066"
    shown = "".join(token_texts(tokenizer, tokenizer.encode(text)))  # each of them one or more byte tokens
    assert all(escape in shown for escape in ("\\u202e# note", "\\u009b31m", "\\u2028y", "\\u200bz", "\\u2066"))
    assert all(ch.isprintable() for ch in shown)
