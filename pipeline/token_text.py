"""How tokens are shown on their own: control characters made visible, a character split over tokens kept readable."""

import codecs
import unicodedata

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode


class VisibleCharacters(dict):
    """A str.translate table: control characters as visible symbols (contexts stay on one line, a token such as "\\r"
    is not blank, a stored escape sequence never reaches the terminal), and every other character that
    str.isprintable calls invisible as an escape (C1 controls, bidi marks and overrides, which would reverse the rest of
    a context, zero-width and tag characters, line separators); spaces of every width stay. Filled as characters come."""

    def __init__(self):
        super().__init__({**{code: chr(0x2400 + code) for code in range(32)}, 0x7F: "␡", ord("\n"): "⏎", ord("\t"): "→"})

    def __missing__(self, code: int) -> str:
        char = chr(code)
        shown = char if char.isprintable() or unicodedata.category(char) == "Zs" else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
        self[code] = shown
        return shown


VISIBLE_CHARACTERS = VisibleCharacters()
BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's printable stand-ins


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text (or [id] without a tokenizer), ids being consecutive tokens of a text, control characters
    made visible.

    A byte-level tokenizer may split one character over several tokens (most emoji, rare CJK characters). Decoded
    on its own, each part would read "�"; instead the character is shown on the token that ends it, and its first
    bytes as escapes on the tokens before (`\\xf0\\x9f\\xa6` then `🦜`), as are bytes that end a character begun before ids.
    """
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    pieces = token_bytes(tokenizer, ids)
    if pieces is None:
        texts = tokenizer.batch_decode([[i] for i in ids])
    else:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        texts = []
        for piece in pieces:
            complete = utf8.decode(piece)
            pending = utf8.getstate()[0][-len(piece) :] if piece else b""  # this token's bytes of an unfinished character
            texts.append(complete + "".join(f"\\x{byte:02x}" for byte in pending))
    return [text.translate(VISIBLE_CHARACTERS) for text in texts]


def token_bytes(tokenizer, ids: list[int]) -> list[bytes] | None:
    """The bytes each token stands for, if the tokenizer is byte-level BPE (as Qwen's is); None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    pieces = []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if token is not None and all(char in BYTE_OF_CHAR for char in token):
            pieces.append(bytes(BYTE_OF_CHAR[char] for char in token))
        else:  # an added token, stored as plain text
            pieces.append(tokenizer.decode([i]).encode("utf-8"))
    return pieces
