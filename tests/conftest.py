"""Shared fixtures: a tiny random-weight Qwen2 model and tokenizer, built in code (never downloaded)."""

import json
import os
from pathlib import Path

import torch

# Without a GPU, decoder="triton" tests run the kernels in Triton's interpreter, which must be chosen before
# triton loads (transformers loads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "You are Qwen, a helpful coding assistant. Write a Python function that reverses a string.",
    "```python\nimport os\nfor name in os.listdir('.'):\n    print(name)\n```",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
] * 4


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens and ChatML template, trained on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    """A 4-layer, 64-wide Qwen2 with random weights."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face folder holding the tiny model and tokenizer, as `--model` accepts it."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """A model of the tiny model's shape and tokenizer but another fingerprint: other weights and rope_theta."""
    folder = tmp_path_factory.mktemp("other-tiny-qwen2")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=len(tokenizer), seed=1)
    model.config.rope_theta = 1000.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and steady when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Sixty prompt/response pairs of varied length, as a local jsonl dataset."""
    path = tmp_path_factory.mktemp("corpus") / "pairs.jsonl"
    rng = np.random.default_rng(0)
    with path.open("w") as handle:
        for i in range(60):
            body = "\n".join(f"    x{j} = x{j - 1} + {i}" for j in range(1, int(rng.integers(2, 30))))
            handle.write(json.dumps({"prompt": f"Write function number {i}.", "response": f"```python\ndef f{i}(x0):\n{body}\n    return x0\n```"}) + "\n")
    return path
