"""How many of a store's rows repeat: rows at a position whose tokens, from the document's start, another stored
document begins with too. A causal model's hidden states there are the same in both documents, so such rows are
copies of a few vectors (docs/FINDINGS.md).

Usage: python scripts/shared_prefixes.py --shards ./shards
"""

from collections import Counter

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import print_error
from pipeline.errors import CrosscodersError
from pipeline.store import SPLITS, Store

MODULUS = (1 << 61) - 1  # a prime: prefixes hash to distinct values but with odds of about 1e-18 a pair
BASE = 1_000_003


def prefix_hashes(tokens: np.ndarray) -> list[int]:
    """The hash of tokens[: i + 1] for each position i."""
    hashes, value = [], 0
    for token in tokens.tolist():
        value = (value * BASE + token + 1) % MODULUS
        hashes.append(value)
    return hashes


def main(shards: str = typer.Option(..., help="The store (folder or fsspec URL).")):
    try:
        store = Store(shards)
    except CrosscodersError as error:
        print_error(error)
        raise typer.Exit(2) from None
    hashes = {doc: prefix_hashes(tokens) for doc, tokens in store.documents()}
    documents_with = Counter(h for doc_hashes in hashes.values() for h in doc_hashes)  # a prefix is once per document
    rows = shared = 0
    vectors, positions = set(), Counter()
    for shard in store.shards:
        for split in SPLITS:
            docs, pos, layers = (store.read(shard, f"{split}/{name}") for name in ("doc", "pos", "layer"))
            for doc, position, layer in zip(docs.tolist(), pos.tolist(), layers.tolist()):
                rows += 1
                prefix = hashes[doc][position]
                if documents_with[prefix] > 1:
                    shared += 1
                    vectors.add((prefix, layer))
                    positions[position] += 1
    table = Table(title=f"rows of {store.url} whose prefix another document shares")
    for column in ("measure", "value"):
        table.add_column(column)
    for measure, value in (("documents", f"{len(hashes):,}"), ("rows", f"{rows:,}"),
                           ("rows whose prefix another document shares", f"{shared:,} ({shared / max(rows, 1):.2%})"),
                           ("distinct vectors among them", f"{len(vectors):,}"),
                           ("positions most shared", ", ".join(f"{p}: {n}" for p, n in positions.most_common(8)) or "-")):
        table.add_row(measure, value)
        print(f"measure {measure} | value {value}", flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)
