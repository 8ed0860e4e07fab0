"""Which positions stage one records: no attention sinks, no special token however the tokenizer names it, and not the
chat's start every document shares, whose hidden states are the same in every document."""

import numpy as np
import torch
from conftest import SPECIAL_TOKENS, build_tiny_model, build_tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from pipeline.corpus import SYSTEM_PROMPT, Document, chat_messages, tokenize_document
from pipeline.positions import RECORD_ALL, SkippedPositions, shared_chat_prefix, skipped_positions, special_token_ids


def chat(tokenizer, user: str, answer: str = "def f(): pass") -> np.ndarray:
    return np.asarray(tokenize_document(Document(0, chat_messages(SYSTEM_PROMPT, user, answer), None), tokenizer, max_seq_len=512))


def test_special_tokens_include_those_the_tokenizer_does_not_name():
    tiny = build_tiny_tokenizer()
    unnamed = PreTrainedTokenizerFast(tokenizer_object=tiny.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    im_start = unnamed.convert_tokens_to_ids("<|im_start|>")
    assert im_start not in unnamed.all_special_ids  # as in the tokenizer converted from the presets' GGUF files
    assert special_token_ids(unnamed) == tuple(sorted(unnamed.convert_tokens_to_ids(SPECIAL_TOKENS)))


def test_the_shared_prefix_is_the_chat_up_to_the_users_words():
    tokenizer = build_tiny_tokenizer()
    prefix = shared_chat_prefix(tokenizer, SYSTEM_PROMPT)
    users = ["Write a function.", "Sort a list", "def g(): ..."]
    chats = [chat(tokenizer, user) for user in users]
    assert all(c[: len(prefix)].tolist() == list(prefix) for c in chats)
    assert len({c[len(prefix)] for c in chats}) == len(users)  # the next token is the user's own
    assert SYSTEM_PROMPT in tokenizer.decode(list(prefix)) and tokenizer.decode(list(prefix)).endswith("user\n")


def test_a_causal_model_has_the_same_hidden_states_on_the_shared_prefix_of_every_document():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    n = len(shared_chat_prefix(tokenizer, SYSTEM_PROMPT))
    with torch.no_grad():
        a, b = (model(torch.from_numpy(chat(tokenizer, user))[None], output_hidden_states=True).hidden_states
                for user in ("Reverse a string.", "Parse a date."))
    for layer in range(len(a)):
        assert torch.equal(a[layer][0, :n], b[layer][0, :n])
        assert not torch.allclose(a[layer][0, n], b[layer][0, n])


def test_mask_skips_the_first_position_special_tokens_and_the_shared_prefix_only_where_a_document_starts_with_it():
    skipped = SkippedPositions(first=True, special_ids=(0, 1), shared_prefix=(1, 7, 8))
    assert skipped.mask(np.array([1, 7, 8, 9, 1, 7])).tolist() == [True, True, True, False, True, False]
    assert skipped.mask(np.array([1, 7, 9, 8, 5])).tolist() == [True, True, False, False, False]  # parts after 2
    assert skipped.mask(np.array([1, 7])).tolist() == [True, True]  # cut inside the prefix: all of it shared
    assert skipped.mask(np.array([5, 6, 0])).tolist() == [True, False, True]
    assert not RECORD_ALL.mask(np.array([1, 7, 8, 0])).any()
    assert SkippedPositions.from_dict(skipped.to_dict()) == skipped


def test_stores_made_before_partial_prefixes_skip_only_a_whole_prefix():
    old = SkippedPositions.from_dict({"first": False, "special_ids": [], "shared_prefix": [1, 7, 8]})
    assert not old.partial_prefix
    assert old.mask(np.array([1, 7, 9, 8])).tolist() == [False, False, False, False]
    assert old.mask(np.array([1, 7, 8, 9])).tolist() == [True, True, True, False]


def test_a_user_prompt_whose_start_merges_with_the_templates_last_token_still_skips_the_template_before_it():
    tokenizer = build_tiny_tokenizer()
    skipped = skipped_positions(tokenizer, True, True, SYSTEM_PROMPT)
    prefix = np.array(skipped.shared_prefix)
    tokens = chat(tokenizer, "    return a + b")  # the template's last "\n" and the indent make one token
    assert tokens[: len(prefix) - 1].tolist() == prefix[:-1].tolist() and tokens[len(prefix) - 1] != prefix[-1]
    assert skipped.mask(tokens).tolist()[: len(prefix)] == [True] * (len(prefix) - 1) + [False]


def test_options_turn_each_rule_off_and_plain_text_has_no_chat_prefix():
    tokenizer = build_tiny_tokenizer()
    assert skipped_positions(tokenizer, True, True, SYSTEM_PROMPT) == SkippedPositions(
        True, special_token_ids(tokenizer), shared_chat_prefix(tokenizer, SYSTEM_PROMPT))
    assert skipped_positions(tokenizer, True, True, None).shared_prefix == ()  # a --text-field corpus
    assert skipped_positions(tokenizer, False, False, SYSTEM_PROMPT) == RECORD_ALL
