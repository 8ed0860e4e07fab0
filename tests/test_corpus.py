"""Corpus: mined code-instruction chats stream fast and reproducibly; local datasets load; split and tokens behave."""

import csv
import itertools
import json
import math
import re

import datasets
import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

import pipeline.hub
from pipeline import corpus
from pipeline.corpus import SYSTEM_PROMPT, CorpusConfig, Document, is_validation, iter_documents, tokenize_document
from pipeline.errors import CrosscodersError


def first(config: CorpusConfig, n: int, start: int = 0) -> list[Document]:
    return list(itertools.islice(iter_documents(config, start), n))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_mined_documents_ask_for_a_signature_and_answer_with_its_code():
    docs = first(CorpusConfig(), 50)
    assert [doc.index for doc in docs] == list(range(50))
    for doc in docs:
        system, user, assistant = doc.messages
        assert doc.text is None
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert system["content"] == SYSTEM_PROMPT
        signature = re.search(r"signature `((?:async )?def (\w+)\(.*\).*:)`", user["content"])
        assert signature, user["content"]
        assert assistant["content"].startswith("```python\n") and assistant["content"].endswith("\n```")
        assert f"def {signature[2]}(" in assistant["content"]
        assert user["content"].endswith(f" with the signature `{signature[1]}`.")  # after what the function does


def test_mined_prompts_open_with_their_own_words():
    """A causal model's hidden states are the same wherever documents start alike: few prompts may share an opening."""
    prompts = sorted(doc.messages[1]["content"] for doc in first(CorpusConfig(), 300))
    def common(a: str, b: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    neighbours = [common(a, b) for a, b in zip(prompts, prompts[1:])]  # sorted: the longest opening shared is with a neighbour
    longest = [max(pair) for pair in zip([0, *neighbours], [*neighbours, 0])]
    assert sorted(longest)[len(longest) // 2] < 20  # 8 characters measured ("Return t"); 47 when all opened "Write a Python function"


def test_first_documents_parse_only_a_few_files(monkeypatch):
    parsed = []
    real = corpus.function_pairs
    monkeypatch.setattr(corpus, "function_pairs", lambda path: parsed.append(path) or real(path))
    assert len(first(CorpusConfig(), 200)) == 200
    assert len(parsed) < 300


def test_same_seed_same_documents_other_seed_other_order():
    a, b, c = first(CorpusConfig(seed=0), 100), first(CorpusConfig(seed=0), 100), first(CorpusConfig(seed=1), 100)
    assert a == b
    assert [d.messages for d in a] != [d.messages for d in c]


def test_start_resumes_at_that_index():
    full = first(CorpusConfig(seed=3), 400)
    assert first(CorpusConfig(seed=3), 100, start=300) == full[300:]


def test_the_mined_files_fingerprint_changes_when_packages_change(tmp_path, monkeypatch):
    stdlib, site = tmp_path / "stdlib", tmp_path / "site-packages"
    for folder, name in ((stdlib, "os.py"), (site / "pkg", "core.py")):
        folder.mkdir(parents=True)
        (folder / name).write_text("x = 1\n")
    monkeypatch.setattr(corpus, "mined_roots", lambda: [[str(stdlib)], [str(site)]])
    before = corpus.mined_files_fingerprint()
    assert corpus.mined_files_fingerprint() == before
    (site / "pkg" / "core.py").write_text("x = 2  # upgraded\n")
    upgraded = corpus.mined_files_fingerprint()
    (site / "new.py").write_text("y = 1\n")
    added = corpus.mined_files_fingerprint()
    monkeypatch.setattr(corpus, "MINED_PROMPTS", corpus.MINED_PROMPTS + 1)  # the same files, prompts laid out otherwise
    assert len({before, upgraded, added, corpus.mined_files_fingerprint()}) == 4


def test_local_jsonl_chat_pairs_keep_every_row_once(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "id": i} for i in range(300)]
    config = CorpusConfig(dataset=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), seed=1, system_prompt="Be brief.")
    docs = list(iter_documents(config))
    assert [doc.index for doc in docs] == list(range(300))
    pairs = [(doc.messages[1]["content"], doc.messages[2]["content"]) for doc in docs]
    assert sorted(pairs) == sorted((row["prompt"], row["response"]) for row in rows)
    assert pairs != [(row["prompt"], row["response"]) for row in rows]  # shuffled
    assert docs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert list(iter_documents(config, start=250)) == docs[250:]


def test_text_field_gives_raw_text_documents(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"content": f"print({i})"} for i in range(20)])
    docs = list(iter_documents(CorpusConfig(dataset=str(path), text_field="content")))
    assert all(doc.messages is None for doc in docs)
    assert sorted(doc.text for doc in docs) == sorted(f"print({i})" for i in range(20))


def test_empty_text_rows_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"content": text} for text in ("print(1)", "", "print(2)", "")])
    docs = list(iter_documents(CorpusConfig(dataset=str(path), text_field="content")))
    assert sorted(doc.text for doc in docs) == ["print(1)", "print(2)"] and [doc.index for doc in docs] == [0, 1]


def test_null_fields_are_skipped_not_read_as_the_text_none(tmp_path):
    rows = [{"content": "print(1)"}, {"content": None}, {"other": 1}]  # the last lacks the field: datasets reads null
    docs = list(iter_documents(CorpusConfig(dataset=str(write_jsonl(tmp_path / "text.jsonl", rows)), text_field="content")))
    assert [doc.text for doc in docs] == ["print(1)"]
    rows = [{"prompt": "q", "response": "a"}, {"prompt": None, "response": "a"}, {"prompt": "q"}]
    docs = list(iter_documents(CorpusConfig(dataset=str(write_jsonl(tmp_path / "pairs.jsonl", rows)))))
    assert [(doc.messages[1]["content"], doc.messages[2]["content"]) for doc in docs] == [("q", "a")]


def test_an_empty_or_malformed_file_is_a_one_line_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CrosscodersError, match=r"empty.jsonl is empty; give a file with rows$"):
        list(iter_documents(CorpusConfig(dataset=str(tmp_path / "empty.jsonl"))))
    (tmp_path / "cut.jsonl").write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q", "resp')
    with pytest.raises(CrosscodersError, match=r"could not read dataset .*cut.jsonl: .*; check the file$"):
        list(iter_documents(CorpusConfig(dataset=str(tmp_path / "cut.jsonl"))))


def test_missing_field_names_it_and_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(CrosscodersError, match=r"'prompt'.*instruction, output.*--prompt-field/--response-field"):
        list(iter_documents(CorpusConfig(dataset=str(path))))
    with pytest.raises(CrosscodersError, match=r"'body'.*--text-field"):
        list(iter_documents(CorpusConfig(dataset=str(path), text_field="body")))


def test_parquet_file_and_csv_folder_load(tmp_path, monkeypatch):
    # datasets sleeps 5 s when a parquet stream ends, a workaround for an Arrow threading bug
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    folder = tmp_path / "csv"
    folder.mkdir()
    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    for dataset in [tmp_path / "pairs.parquet", folder]:
        docs = list(iter_documents(CorpusConfig(dataset=str(dataset))))
        assert sorted(doc.messages[1]["content"] for doc in docs) == sorted(row["prompt"] for row in rows)


def test_missing_path_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CrosscodersError, match="neither an existing file or folder nor a hub id"):
        first(CorpusConfig(dataset=str(tmp_path / "nope.jsonl")), 1)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nno network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(pipeline.hub, "hub_answers", lambda *args, **kwargs: True)
    with pytest.raises(CrosscodersError, match=r"could not load .*\(offline\?\).*local") as info:
        first(CorpusConfig(dataset="someone/code-instructions"), 1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("offline, hub", [(True, "offline mode is set (HF_HUB_OFFLINE)"), (False, "http://127.0.0.1:9 does not answer")])
def test_a_hub_dataset_on_a_machine_without_the_hub_fails_at_once(monkeypatch, caplog, offline, hub):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(CrosscodersError, match=re.escape(f"from the Hugging Face Hub ({hub}), from which it streams")):
        first(CorpusConfig(dataset="someone/code-instructions"), 1)
    assert "Retrying" not in caplog.text  # the hub's downloads retry a refused connection for about 23 s


def test_a_file_name_holding_glob_characters_is_that_file(tmp_path):
    write_jsonl(tmp_path / "data1.jsonl", [{"prompt": "q", "response": "the other file"}])
    path = write_jsonl(tmp_path / "data[1].jsonl", [{"prompt": "q", "response": "this file"}])
    assert [doc.messages[2]["content"] for doc in first(CorpusConfig(dataset=str(path)), 5)] == ["this file"]
    folder = tmp_path / "d[1]"
    folder.mkdir()
    write_jsonl(folder / "x.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(CrosscodersError, match=r"d\[1\] has \[ \] \* or \? in its path.*rename the folder"):
        first(CorpusConfig(dataset=str(folder)), 1)


def test_a_corrupt_parquet_file_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(CrosscodersError, match=r"could not read dataset file .*bad.parquet: Parquet magic bytes .*; check the file$"):
        first(CorpusConfig(dataset=str(tmp_path / "bad.parquet")), 1)


def test_csv_text_that_pandas_would_read_as_missing_is_kept(tmp_path):
    folder = tmp_path / "csv"
    (folder / ".vscode").mkdir(parents=True)
    (folder / "train.csv").write_text("prompt,response\nq1,None\nq2,NaN\nq3,N/A\nq4,null\nq5,\n")
    (folder / "dataset_info.json").write_text("{}")  # beside the csv files, as hub exports have it; hidden files do not count
    (folder / ".vscode" / "settings.json").write_text("{}")
    (folder / "train-2.csv").write_text("prompt,response\nq6,None\n")
    for dataset in (folder / "train.csv", folder):
        docs = list(iter_documents(CorpusConfig(dataset=str(dataset))))
        expected = ["N/A", "NaN", "None", "null"] + (["None"] if dataset == folder else [])  # q5's is empty
        assert sorted(doc.messages[2]["content"] for doc in docs) == sorted(expected)


def test_a_csv_store_of_the_reading_before_is_not_extended(tmp_path, monkeypatch):
    """The reading before dropped rows whose cells read None: another document at each index, in files of the same bytes."""
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,response\nq1,None\n")
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "response": "a"}])
    csv_now, jsonl_now = (corpus.dataset_files_fingerprint(CorpusConfig(dataset=str(p))) for p in (path, jsonl))
    monkeypatch.setattr(corpus, "CSV_READING", 1)
    assert corpus.dataset_files_fingerprint(CorpusConfig(dataset=str(path))) != csv_now
    assert corpus.dataset_files_fingerprint(CorpusConfig(dataset=str(jsonl))) == jsonl_now  # other formats are read as before


def test_a_column_of_lists_is_refused_not_stored_as_its_repr(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(CrosscodersError, match=r"column 'messages' of dataset .* holds list values, not text; set --text-field"):
        first(CorpusConfig(dataset=str(path), text_field="messages"), 1)


def test_mined_answers_keep_their_lines_past_a_form_feed(tmp_path):
    source = 'def a():\n    """Return one, the first number."""\n    return 1\n\x0c\ndef b():\n    """Return two, the second number."""\n    return 2\n'
    (tmp_path / "m.py").write_text(source)
    answers = [response for _, response, _ in corpus.function_pairs(tmp_path / "m.py")]
    assert answers[1] == '```python\ndef b():\n    """Return two, the second number."""\n    return 2\n```'


def test_a_mined_answer_is_the_method_as_code_whatever_its_strings_hold(tmp_path):
    """A docstring's ``` once closed the answer's fence, and a string line at column 0 kept the whole method indented."""
    source = (
        "class C:\n"
        "    def show(self):\n"
        '        """Print an example, fenced as markdown:\n\n        ```\n        C().show()\n        ```\n        """\n'
        '        text = """one\n'
        'two"""\n'
        "        return text\n"
    )
    (tmp_path / "m.py").write_text(source)
    [(_, answer, _)] = corpus.function_pairs(tmp_path / "m.py")
    fence, rest = answer.split("python\n", 1)
    assert fence == "````" and rest.endswith("\n````") and "````" not in rest[:-4]
    code = rest[: -len("\n````")]
    assert code.startswith('def show(self):\n    """Print') and '\ntwo"""\n    return text' in code
    namespace = {}
    exec(code, namespace)  # the answer is valid Python, its string as in the source
    assert namespace["show"](None) == "one\ntwo"


def test_editable_install_finders_are_not_mined_nor_fingerprinted(tmp_path, monkeypatch):
    """Their text names the checkout's path, so two checkouts of one install would read as other packages."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "pkg.py").write_text("x = 1\n")
    monkeypatch.setattr(corpus, "mined_roots", lambda: [[], [str(site)]])
    before = corpus.mined_files_fingerprint()
    (site / "__editable___crosscoders_0_1_0_finder.py").write_text("MAPPING = {'pipeline': '/home/a/checkout/pipeline'}\n")
    assert corpus.mined_files_fingerprint() == before
    assert list(corpus.python_files(site)) == [site / "pkg.py"]


@pytest.mark.parametrize("options, message", [
    ({"hf_split": "train[:10]"}, "--hf-split 'train[:10]' is not a split name such as train or test; slices"),
    ({"hf_split": ""}, "--hf-split '' is not a split name"),
    ({"seed": -1}, "--seed -1 must be from 0 to 4294967295"),
    ({"seed": 2**32}, "--seed 4294967296 must be from 0"),
    ({"val_fraction": 2}, "--val-fraction 2 must be at least 0 and below 1"),
    ({"val_fraction": -0.1}, "--val-fraction -0.1 must be"),
    ({"val_fraction": 1.0}, "--val-fraction 1.0 must be"),
])
def test_out_of_range_options_are_refused(options, message):
    with pytest.raises(CrosscodersError, match=re.escape(message)):
        CorpusConfig(**options)


def test_validation_split_is_five_percent_and_deterministic():
    config = CorpusConfig(seed=7)
    n = 20_000
    held_out = [is_validation(i, config) for i in range(n)]
    sd = math.sqrt(n * 0.05 * 0.95)
    assert abs(sum(held_out) - n * 0.05) < 5 * sd
    assert held_out == [is_validation(i, config) for i in range(n)]
    assert held_out != [is_validation(i, CorpusConfig(seed=8)) for i in range(n)]


def test_the_split_follows_the_rule_docs_format_md_states():
    import hashlib

    config = CorpusConfig(seed=5, val_fraction=0.3)
    for doc_index in range(2000):
        digest = hashlib.blake2b(f"{config.seed}:{doc_index}".encode(), digest_size=8).digest()
        assert is_validation(doc_index, config) == (int.from_bytes(digest, "little") / 2**64 < config.val_fraction)


def test_tokenize_document_uses_chat_template_and_truncates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    doc = first(CorpusConfig(), 1)[0]
    ids = tokenize_document(doc, tokenizer, max_seq_len=100_000)
    head = tokenizer.encode("<|im_start|>system\n", add_special_tokens=False)
    assert ids[: len(head)] == head
    assert SYSTEM_PROMPT in tokenizer.decode(ids)
    assert tokenize_document(doc, tokenizer, max_seq_len=16) == ids[:16]
    text_ids = tokenize_document(Document(0, None, "def add(a, b):\n    return a + b\n" * 20), tokenizer, 8)
    assert len(text_ids) == 8
