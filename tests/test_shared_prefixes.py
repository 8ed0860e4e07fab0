"""scripts/shared_prefixes.py counts the rows whose prefix another document shares, as a brute-force search does."""

from forked_cli import run_python
from test_cache import run_cache

from pipeline.store import SPLITS


def test_counts_the_rows_whose_prefix_another_document_shares(tiny_model_dir, corpus_file, tmp_path):
    store = run_cache(tiny_model_dir, corpus_file, tmp_path / "s", n_tokens=1500, skip_chat_prefix=False)
    docs = store.document_tokens()
    expected = 0
    for shard in store.shards:
        for split in SPLITS:
            for doc, pos in zip(store.read(shard, f"{split}/doc"), store.read(shard, f"{split}/pos")):
                prefix = docs[doc][: pos + 1]
                expected += any(other != doc and len(tokens) > pos and (tokens[: pos + 1] == prefix).all() for other, tokens in docs.items())
    assert 0 < expected < store.n_pairs  # the chat's start, and "Write function number ", open every document
    result = run_python("scripts/shared_prefixes.py", "--shards", str(tmp_path / "s"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"measure rows | value {store.n_pairs:,}\n" in result.stdout
    assert f"measure rows whose prefix another document shares | value {expected:,} ({expected / store.n_pairs:.2%})\n" in result.stdout


def test_a_missing_store_is_a_one_line_error(tmp_path):
    result = run_python("scripts/shared_prefixes.py", "--shards", str(tmp_path / "none"), timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no activation store at" in result.stderr
