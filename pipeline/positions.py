"""Which positions of a document stage one records, and evaluation splices: not the attention sinks, and not the
chat template's start that every document shares.

A causal model's hidden state at a position depends only on the tokens up to it, so the shared start (system
prompt, user header) has the same hidden states in every document: recording it would store a few vectors once
per document, some of them attention sinks with norms over ten times the rest's, and an SAE would spend latents
and most of some layers' variance on them.
"""

from dataclasses import dataclass

import numpy as np

from pipeline.corpus import Document, chat_messages, tokenize_document


@dataclass(frozen=True)
class SkippedPositions:
    """What stage one does not record; saved in the store's metadata as `skipped`."""

    first: bool  # position 0
    special_ids: tuple[int, ...]  # special tokens, wherever they are
    shared_prefix: tuple[int, ...]  # the token ids every chat document starts with
    # skip as much of shared_prefix as a document starts with, not only all of it: a user's words that start with a
    # newline merge with the template's last one into one token ("\n\n"), yet the positions before it are shared. The
    # stores of versions before this field skipped only a whole prefix (or a document cut inside it).
    partial_prefix: bool = True

    def mask(self, tokens: np.ndarray) -> np.ndarray:
        """Positions not to record: [len(tokens)] bool, of a document's token ids."""
        mask = np.isin(tokens, self.special_ids)
        if self.first:
            mask[:1] = True
        n = min(len(self.shared_prefix), len(tokens))
        parted = np.flatnonzero(tokens[:n] != np.asarray(self.shared_prefix[:n], dtype=tokens.dtype))
        if not parted.size:  # all of the prefix, or a document cut inside it
            mask[:n] = True
        elif self.partial_prefix:
            mask[: parted[0]] = True
        return mask

    def to_dict(self) -> dict:
        """As recorded in a store; partial_prefix only where true, so that stores made before it keep their metadata."""
        whole = {"first": self.first, "special_ids": list(self.special_ids), "shared_prefix": list(self.shared_prefix)}
        return {**whole, "partial_prefix": True} if self.partial_prefix else whole

    @classmethod
    def from_dict(cls, values: dict) -> "SkippedPositions":
        return cls(values["first"], tuple(values["special_ids"]), tuple(values["shared_prefix"]),
                   values.get("partial_prefix", False))


RECORD_ALL = SkippedPositions(first=False, special_ids=(), shared_prefix=())


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """Every special token's id: the named ones (bos, eos, pad, ...) and every added token marked special, such as
    Qwen's <|im_start|>, which a tokenizer converted from GGUF does not name."""
    added = (index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return tuple(sorted(set(tokenizer.all_special_ids) | set(added)))


def shared_chat_prefix(tokenizer, system_prompt: str) -> tuple[int, ...]:
    """The token ids the chat template puts before the user's words in every document: where two chats that differ
    from the user's first character on part."""
    chats = [tokenize_document(Document(0, chat_messages(system_prompt, user, "x"), None), tokenizer, max_seq_len=10**9)
             for user in ("A", "B")]
    n = next((i for i, (a, b) in enumerate(zip(*chats)) if a != b), min(map(len, chats)))
    return tuple(chats[0][:n])


def skipped_positions(tokenizer, skip_special: bool, skip_chat_prefix: bool, system_prompt: str | None,
                      recorded: dict | None = None) -> SkippedPositions:
    """The positions stage one skips; system_prompt is None for a plain-text corpus, which has no chat template.
    recorded: the `skipped` of the store a run extends, whose rule for the shared prefix it keeps."""
    prefix = shared_chat_prefix(tokenizer, system_prompt) if skip_chat_prefix and system_prompt is not None else ()
    partial = recorded is None or SkippedPositions.from_dict(recorded).partial_prefix
    return SkippedPositions(skip_special, special_token_ids(tokenizer) if skip_special else (), prefix, partial)
