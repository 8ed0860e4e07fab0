"""Documents to run the model over: code-instruction chats mined offline, or rows of a `datasets` source."""

import ast
import collections
import dataclasses
import glob
import hashlib
import itertools
import logging
import os
import platform
import random
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.cli import option
from pipeline.errors import CrosscodersError, one_line

SYSTEM_PROMPT = "You are Qwen, a helpful coding assistant."
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}  # pandas reads "None", "NaN", "null", "N/A" as missing otherwise
CSV_READING = 2  # in a csv store's dataset_files; 1 dropped rows whose cells read "None", "NaN"... as missing
FUNCTION_BUFFER = 256  # mined functions held for shuffling; small so the first documents come fast
ROW_BUFFER = 10_000  # dataset rows held for shuffling
MAX_FUNCTION_LINES = 60
MIN_DOCSTRING_WORDS = 4
MAX_FILE_BYTES = 1_000_000  # larger files are mostly generated tables, slow to parse
FINGERPRINT_BYTES = 1 << 20  # of each dataset file, the first and last MiB count in its fingerprint
# The layout of mined prompts, in a store's mined_files: a store of another layout is never extended with this one's
# documents. 2: the docstring first (1 opened with "Write a Python function", which 8% of positions shared).
# 3: answers cut at the line breaks ast counts (2 also broke lines at form feeds and other separators, so an answer
# after one lost its last lines). 4: an answer's fence is longer than any backtick run in its code (3 closed it at a
# docstring's ```), and a method loses its def's indent only (3 kept it where a string has a line at column 0).
MINED_PROMPTS = 4
# Tests, caches, GUI demos and Python-2-era code make poor or duplicate examples.
SKIP_DIRS = {"__pycache__", "site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "pydoc_data", "ensurepip"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"
SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # as datasets names splits: "train", "test.python"
BACKTICKS = re.compile(r"`+")
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line breaks ast counts; str.splitlines also breaks at \f, \x1c-\x1e, \x85, \u2028-9


@dataclass(frozen=True)
class CorpusConfig:
    """Which documents to read and how to shuffle and split them."""

    dataset: str | None = option(None, "Hub id or local jsonl/json/parquet/csv file or folder; default: Python functions mined from this machine.")
    prompt_field: str = option("prompt", "Column holding the user prompt.")
    response_field: str = option("response", "Column holding the assistant response.")
    text_field: str | None = option(None, "Column of raw text; when set, documents are not chat-formatted.")
    hf_split: str = option("train", "Split of the dataset to read.")
    system_prompt: str = option(SYSTEM_PROMPT, "System prompt of every chat document.")
    seed: int = option(0, "Seed of the corpus shuffle and of the per-token layer draw.")
    val_fraction: float = option(0.05, "Fraction of documents held out for validation and evaluation.")

    def __post_init__(self):
        if not 0 <= self.seed < 2**32:
            raise CrosscodersError(f"--seed {self.seed} must be from 0 to {2**32 - 1}")
        if not 0 <= self.val_fraction < 1:
            raise CrosscodersError(f"--val-fraction {self.val_fraction} must be at least 0 and below 1 (0.05 holds out 5% of documents)")
        if not SPLIT_NAME.fullmatch(self.hf_split):
            raise CrosscodersError(f"--hf-split {self.hf_split!r} is not a split name such as train or test; slices (train[:10%]) "
                                   "are not supported: cap the documents with --n-tokens")

    def to_dict(self) -> dict:
        """The config as plain JSON values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Document:
    """One document: a chat (system, user, assistant) or raw text."""

    index: int  # position in the shuffled stream, stable for a config
    messages: tuple[dict, ...] | None  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    text: str | None


def iter_documents(config: CorpusConfig, start: int = 0) -> Iterator[Document]:
    """Streams the shuffled documents from index `start` on; skipped ones are read but never tokenized."""
    if config.dataset is None:
        rows = mined_pairs(config.seed)
    else:
        rows = dataset_rows(config)
    for index, (prompt, response, text) in enumerate(itertools.islice(rows, start, None), start):
        if text is not None:
            yield Document(index, None, text)
        else:
            yield Document(index, chat_messages(config.system_prompt, prompt, response), None)


def chat_messages(system_prompt: str, prompt: str, response: str) -> tuple[dict, ...]:
    """A chat document's turns: the system prompt, the user's prompt, the assistant's response."""
    return (
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": response},
    )


def tokenize_document(doc: Document, tokenizer, max_seq_len: int) -> list[int]:
    """Token ids of a document, chats through the tokenizer's chat template, cut to `max_seq_len`."""
    if doc.messages is not None:
        ids = tokenizer.apply_chat_template(list(doc.messages), tokenize=True, return_dict=False)
    else:
        ids = tokenizer(doc.text)["input_ids"]
    return list(ids[:max_seq_len])


def check_chat_template(config: CorpusConfig, tokenizer, model: str) -> None:
    """Chat documents need the tokenizer's chat template: a model without one is refused before anything is written."""
    if config.text_field is None and not tokenizer.chat_template:
        raise CrosscodersError(f"model {model} has no chat template to format chat documents; "
                               "use a plain-text corpus instead: --dataset FILE --text-field COLUMN")


def is_validation(doc_index: int, config: CorpusConfig) -> bool:
    """Whether a document is held out: a hash of (seed, index) mapped to [0, 1), below `val_fraction`."""
    digest = hashlib.blake2b(f"{config.seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < config.val_fraction


def mined_pairs(seed: int) -> Iterator[tuple[str, str, None]]:
    """(prompt, response, None) for documented functions of this machine's stdlib, then its installed packages."""
    file_rng, buffer_rng = random.Random(f"files:{seed}"), random.Random(f"functions:{seed}")
    return buffer_shuffle(
        (pair for path in shuffled_files(file_rng) for pair in function_pairs(path)), FUNCTION_BUFFER, buffer_rng
    )


def mined_roots() -> list[list[str]]:
    """The folders the default corpus is mined from, in two groups: the stdlib, then site-packages."""
    paths = sysconfig.get_paths()
    return [[paths["stdlib"]], sorted({paths["purelib"], paths["platlib"]})]


def shuffled_files(rng: random.Random) -> Iterator[Path]:
    """Python files of the stdlib, then of site-packages, each group in seeded order and listed only when reached."""
    for group in mined_roots():
        files = sorted(path for root in group for path in python_files(Path(root)))
        rng.shuffle(files)
        yield from files


def mined_files_fingerprint() -> str:
    """sha256 of the Python version, the prompts' layout, and the paths (relative to their root) and sizes of the mined files.

    Installing, removing or upgrading a package changes it, and with it the default corpus's documents.
    """
    digest = hashlib.sha256(f"python {platform.python_version()}\nprompts {MINED_PROMPTS}\n".encode())
    for group in mined_roots():
        for root in group:
            for path in sorted(python_files(Path(root))):
                digest.update(f"{path.relative_to(root)} {_size(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def dataset_files_fingerprint(config: CorpusConfig) -> str | None:
    """For a local --dataset file or folder, sha256 of each file's path (relative to the folder), size and first and
    last MiB; None for the mined default or a hub id. Rows added, removed or changed in size change it, as does another
    file under the same name."""
    path = Path(config.dataset).expanduser() if config.dataset is not None else None
    if path is None or not path.exists():
        return None
    root, files = (path.parent, [path]) if path.is_file() else (path, dataset_files(path))
    # how csv cells are read decides which rows are documents: stores read otherwise are not extended with these
    digest = hashlib.sha256(f"csv {CSV_READING}\n".encode() if reads_as_csv(files) else b"")
    for file in files:
        try:
            size = file.stat().st_size
            with file.open("rb") as handle:
                head = handle.read(FINGERPRINT_BYTES)
                handle.seek(max(size - FINGERPRINT_BYTES, len(head)))
                tail = handle.read()
        except OSError as error:
            raise CrosscodersError(f"cannot read dataset file {file}: {error.strerror or error}; fix it or leave it out") from None
        digest.update(f"{file.relative_to(root)} {size} ".encode() + hashlib.sha256(head + tail).digest())
    return "sha256:" + digest.hexdigest()


def dataset_files(folder: Path) -> list[Path]:
    """A dataset folder's files, as the datasets library sees them: hidden files and folders (.git, .DS_Store) left out."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts))


def reads_as_csv(files: list[Path]) -> bool:
    """Whether the datasets library reads these files as csv: its format is their most common one."""
    formats = collections.Counter(BUILDERS[f.suffix.lower()] for f in files if f.suffix.lower() in BUILDERS)
    return bool(formats) and formats.most_common(1)[0][0] == "csv"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # e.g. a broken link, which mining skips too
        return -1


def python_files(root: Path) -> Iterator[Path]:
    """The .py files under `root`, leaving out tests, caches, nested site-packages and editable installs' finders (which
    name their checkout's path, so their size would make each checkout's fingerprint another)."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith((".dist-info", ".egg-info"))]
        yield from (Path(folder, name) for name in files if name.endswith(".py") and not name.startswith("__editable__"))


def function_pairs(path: Path) -> list[tuple[str, str, None]]:
    """A (prompt, response) per documented, not too long function or method of one file; [] if it does not parse."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return []
        source = path.read_bytes().decode("utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in third-party code
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = LINE_BREAK.split(source)
    pairs = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            pairs += [pair for child in node.body if (pair := function_pair(child, lines, node.name))]
        elif pair := function_pair(node, lines):
            pairs.append(pair)
    return pairs


def function_pair(node: ast.AST, lines: list[str], class_name: str | None = None) -> tuple[str, str, None] | None:
    """The instruction asking for a function with this signature and docstring, and its source as the answer."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    docstring = ast.get_docstring(node)
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if not docstring or len(docstring.split()) < MIN_DOCSTRING_WORDS or node.end_lineno - first >= MAX_FUNCTION_LINES:
        return None
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    signature = f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"
    owner = f" (a method of class `{class_name}`)" if class_name else ""
    prompt = f"{docstring}\n\nWrite this as a Python function{owner} with the signature `{signature}`."  # its own words first
    code = "\n".join(outdent(line, node.col_offset) for line in lines[first - 1 : node.end_lineno])
    fence = "`" * max(3, 1 + max(map(len, BACKTICKS.findall(code)), default=0))  # CommonMark: a shorter run cannot close it
    return prompt, f"{fence}python\n{code}\n{fence}", None


def outdent(line: str, indent: int) -> str:
    """A line of a def `indent` columns in, moved to column 0; a line of a string that starts further left keeps its text."""
    return line[min(indent, len(line) - len(line.lstrip(" \t"))) :]


def buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Items in a seeded order that only looks `size` items ahead, so it streams."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def dataset_rows(config: CorpusConfig) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(prompt, response, None) or (None, None, text) per row of a shuffled, streamed `datasets` source;
    rows of empty or null text, or with a null prompt or response, are skipped (they have no token to record)."""
    fields = [config.text_field] if config.text_field else [config.prompt_field, config.response_field]
    option = "--text-field" if config.text_field else "--prompt-field/--response-field"
    for row in shuffled_rows(config):
        for field in fields:
            if field not in row:
                raise CrosscodersError(
                    f"dataset {config.dataset} has no field {field!r} (columns: {', '.join(sorted(row))}); "
                    f"set {option} to the right column"
                )
        values = [row[field] for field in fields]
        if any(value is None for value in values):  # null, or missing from this row of a json file
            continue
        for field, value in zip(fields, values):
            if not isinstance(value, (str, int, float)):  # a list of chat turns, a nested record, bytes
                raise CrosscodersError(
                    f"column {field!r} of dataset {config.dataset} holds {type(value).__name__} values, not text; "
                    f"set {option} to text columns"
                )
        if config.text_field:
            if text := str(values[0]):
                yield None, None, text
        else:
            yield str(values[0]), str(values[1]), None


def shuffled_rows(config: CorpusConfig) -> Iterator[dict]:
    """load_rows' rows, shuffled; a stream parses lazily, so a file that cannot be read fails here, in one line."""
    path = Path(config.dataset).expanduser()
    if path.is_file() and path.stat().st_size == 0:
        raise CrosscodersError(f"dataset file {path} is empty; give a file with rows")
    rows = iter(load_rows(config).shuffle(seed=config.seed, buffer_size=ROW_BUFFER))
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as error:  # a malformed line, a dropped connection to the hub
            raise CrosscodersError(f"could not read dataset {config.dataset}: {one_line(error)}; check the file") from error
        yield row


def load_rows(config: CorpusConfig):
    """The streaming `datasets.IterableDataset` for a local file, folder or hub id."""
    import datasets  # slow to import; the mined default does without it

    from pipeline.hub import hub_answers, hub_silence

    logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)  # its read errors reach the user as ours
    path = Path(config.dataset).expanduser()
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise CrosscodersError(f"dataset file {path} is not jsonl/json/parquet/csv; convert it or pass a hub id")
        options = CSV_OPTIONS if builder == "csv" else {}
        try:  # the datasets library reads data_files as glob patterns: escaped, a name holding [ ] * ? is this file
            return datasets.load_dataset(builder, data_files={config.hf_split: glob.escape(str(path))}, split=config.hf_split,
                                         streaming=True, **options)
        except Exception as e:
            raise CrosscodersError(f"could not read dataset file {path}: {one_line(e)}; check the file") from e
    if path.is_dir():
        if glob.has_magic(str(path)):
            raise CrosscodersError(f"dataset folder {path} has [ ] * or ? in its path, which the datasets library reads as a "
                                   "pattern; rename the folder or link it under a plain name")
        options = CSV_OPTIONS if reads_as_csv(dataset_files(path)) else {}
        try:
            return datasets.load_dataset(str(path), split=config.hf_split, streaming=True, **options)
        except Exception as e:
            raise CrosscodersError(f"could not load split {config.hf_split!r} of folder {path}: {one_line(e)}") from e
    if path.suffix.lower() in BUILDERS or not HUB_ID.fullmatch(config.dataset):
        raise CrosscodersError(f"dataset {config.dataset} is neither an existing file or folder nor a hub id; check it")
    if not hub_answers(config.dataset, "README.md", repo_type="dataset"):
        raise CrosscodersError(f"could not load dataset {config.dataset} from the Hugging Face Hub ({hub_silence()}), from which it "
                               "streams; a local jsonl/json/parquet/csv file or folder works too")
    try:
        return datasets.load_dataset(config.dataset, split=config.hf_split, streaming=True)
    except Exception as e:
        raise CrosscodersError(
            f"could not load dataset {config.dataset} from the Hugging Face Hub (offline?): {one_line(e)}; "
            f"a local jsonl/json/parquet/csv file or folder works too"
        ) from e
