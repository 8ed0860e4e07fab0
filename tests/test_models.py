import hashlib
import importlib.util
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import files, models
from pipeline.errors import CrosscodersError
from pipeline.models import MARKER, PRESETS, ModelInfo, Preset, decoder_layers, embedding, final_norm, load_model, unembedding_matrix
from pipeline.token_text import token_texts

REAL_PRESET = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def test_a_local_folder_loads_in_eval_mode_with_its_shape(tiny, tiny_model_dir):
    info = tiny.info
    assert (info.name, info.d_model, info.n_layers, info.n_hidden_states) == (str(tiny_model_dir), 64, 4, 5)
    assert info.vocab_size == len(tiny.tokenizer)
    assert info.fingerprint.startswith("hf-sha256:")
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.model.config._attn_implementation == "sdpa"
    hidden = tiny.model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert len(hidden) == info.n_hidden_states


def test_a_local_model_is_named_by_its_absolute_path(tiny, tiny_model_dir, monkeypatch):
    """Stores and runs record the name: eval-sae and sae-features load it again from other folders."""
    monkeypatch.chdir(tiny_model_dir.parent)
    info = load_model(tiny_model_dir.name).info
    assert (info.name, info.fingerprint) == (str(tiny_model_dir), tiny.info.fingerprint)


def test_the_fingerprint_is_stable_across_loads_and_dtypes(tiny, tiny_model_dir):
    again = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert again.info.fingerprint == tiny.info.fingerprint
    assert next(again.model.parameters()).dtype == torch.bfloat16


def test_the_fingerprint_changes_with_the_config(tiny, tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder)).info.fingerprint == tiny.info.fingerprint

    config["max_position_embeddings"] = 1024
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder)).info.fingerprint != tiny.info.fingerprint


def fine_tune(folder, tensor="model.layers.2.mlp.down_proj.weight"):
    """Changes one tensor of the folder's weights, as a merged LoRA on one layer would; the config stays."""
    weights = load_file(folder / "model.safetensors")
    weights[tensor] += 1e-2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_the_fingerprint_covers_the_weights(tiny, tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    save_file({"w": torch.ones(3)}, copy / "consolidated.safetensors")  # a file from_pretrained does not read
    assert load_model(str(copy)).info.fingerprint == tiny.info.fingerprint
    fine_tune(copy)
    assert load_model(str(copy)).info.fingerprint != tiny.info.fingerprint


def test_the_fingerprint_covers_the_file_from_pretrained_loads_not_a_stale_index_beside_it(tiny, tiny_model_dir, tmp_path):
    """from_pretrained reads model.safetensors before model.safetensors.index.json: so must the fingerprint."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    shard = load_file(folder / "model.safetensors")
    shard["model.layers.2.mlp.down_proj.weight"] += 1e-2  # another model's weights, in the shard the index names
    save_file(shard, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_model(str(folder)).info.fingerprint == tiny.info.fingerprint
    (folder / "model.safetensors").unlink()  # now from_pretrained reads the shard
    assert load_model(str(folder)).info.fingerprint != tiny.info.fingerprint


def test_the_fingerprint_covers_pytorch_bin_weights(tiny_model_dir, tmp_path):
    fingerprints = []
    for name in ("base", "tuned"):
        folder = shutil.copytree(tiny_model_dir, tmp_path / name)
        if name == "tuned":
            fine_tune(folder)
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        fingerprints.append(load_model(str(folder)).info.fingerprint)
    assert fingerprints[0] != fingerprints[1]


UNANSWERED_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, so the connection is refused at once


def hub_without_answer(monkeypatch, offline: bool):
    """The hub as on a machine without internet: HF_HUB_OFFLINE set, or not set and no answer."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNANSWERED_HUB)


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_is_fingerprinted_by_its_downloaded_weights(tiny, tiny_model_dir, tmp_path, monkeypatch, offline):
    for repo in ("base", "tuned"):
        (tmp_path / f"models--someorg--{repo}" / "refs").mkdir(parents=True)
        (tmp_path / f"models--someorg--{repo}" / "refs" / "main").write_text("0" * 40)
        snapshot = shutil.copytree(tiny_model_dir, tmp_path / f"models--someorg--{repo}" / "snapshots" / ("0" * 40))
    fine_tune(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    hub_without_answer(monkeypatch, offline)
    assert load_model("someorg/base").info.fingerprint == tiny.info.fingerprint
    assert load_model("someorg/tuned").info.fingerprint != tiny.info.fingerprint


WEIGHTS_DAMAGED = r"model.safetensors is damaged \(.*\); restore the model's weights"
CONFIG_DAMAGED = r"config.json is damaged \(.*\); restore the model's config.json"


@pytest.mark.parametrize("file, content, message", [
    ("model.safetensors", b"\x05\0\0\0\0\0\0\0[1, ", WEIGHTS_DAMAGED),
    ("model.safetensors", b'\x17\0\0\0\0\0\0\0{"w": {"dtype": "F32"}}', WEIGHTS_DAMAGED),
    ("config.json", b'{"vocab_size": ', CONFIG_DAMAGED),
    ("config.json", b"[1, 2]", CONFIG_DAMAGED),
])
def test_a_damaged_model_file_is_a_one_line_error(tiny_model_dir, tmp_path, file, content, message):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    (folder / file).write_bytes(content)
    with pytest.raises(CrosscodersError, match=message) as error:
        load_model(str(folder))
    assert "\n" not in str(error.value)


def test_model_info_round_trips_through_a_dict(tiny):
    assert ModelInfo.from_dict(json.loads(json.dumps(tiny.info.to_dict()))) == tiny.info


def test_the_module_helpers_return_the_qwen2_modules(tiny):
    model = tiny.model
    assert decoder_layers(model) is model.model.layers and len(decoder_layers(model)) == 4
    assert embedding(model) is model.model.embed_tokens
    assert final_norm(model) is model.model.norm
    assert unembedding_matrix(model) is model.lm_head.weight
    assert unembedding_matrix(model).shape == (tiny.info.vocab_size, 64)


@pytest.mark.parametrize("spec", ["no-such-model", "missing/model.gguf", "someorg/no-such-model"])
def test_an_unloadable_name_lists_the_presets(spec, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CrosscodersError) as raised:
        load_model(spec, cache_dir=tmp_path)
    message = str(raised.value)
    assert f"could not load model '{spec}' ({tmp_path / spec} does not exist" in message
    assert all(name in message for name in PRESETS)
    assert "local .gguf file" in message and "\n" not in message


@pytest.mark.parametrize("offline, hub", [(True, "offline mode is set (HF_HUB_OFFLINE)"), (False, f"{UNANSWERED_HUB} does not answer")])
def test_a_hub_id_missing_from_the_cache_of_a_machine_without_the_hub_fails_at_once(monkeypatch, tmp_path, caplog, offline, hub):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    hub_without_answer(monkeypatch, offline)
    with pytest.raises(CrosscodersError, match=re.escape(f"; {hub} and the Hugging Face cache lacks it)")):
        load_model("someorg/absent", cache_dir=tmp_path)
    assert "Retrying" not in caplog.text  # the hub's downloads retry a refused connection for about 23 s


def test_a_preset_with_missing_parts_gives_the_pip_command(monkeypatch, tmp_path):
    preset = Preset(("crosscoders-absent-part1", "crosscoders-absent-part2"), "1.0", "0" * 64, 10, "absent")
    monkeypatch.setitem(PRESETS, "absent", preset)
    command = "pip install crosscoders-absent-part1==1.0 crosscoders-absent-part2==1.0"
    with pytest.raises(CrosscodersError, match=f"`{command}` .*pip install '.\\[absent\\]'"):
        load_model("absent", cache_dir=tmp_path)


def test_a_digest_mismatch_is_refused_and_leaves_no_cache(monkeypatch, tmp_path):
    packages = tmp_path / "site"
    for i in (1, 2):
        package = packages / f"crosscoders_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part0{i}.bin").write_bytes(b"not a gguf")
        (package / "__init__.py").write_text(
            f"import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'data', 'part0{i}.bin')\n"
        )
    monkeypatch.syspath_prepend(packages)
    monkeypatch.setitem(PRESETS, "fake", Preset(("crosscoders-fake-part1", "crosscoders-fake-part2"), "1.0", "0" * 64, 20, "fake"))
    cache = tmp_path / "cache"
    with pytest.raises(CrosscodersError, match=r"fake\.gguf .* has sha256 [0-9a-f]{64} \(20 bytes\), expected 0{64}"):
        load_model("fake", cache_dir=cache)
    assert [path.name for path in (cache / "models").iterdir()] == [".fake.lock"]


@pytest.mark.parametrize("source", ["preset", "gguf"])
def test_ranks_loading_a_new_model_at_once_convert_it_once(source, monkeypatch, tmp_path):
    """torchrun's ranks all load at once: one converts, the others wait and load its complete folder."""
    conversions = []

    def slow_dequantize(gguf, sha256, out):
        conversions.append(gguf.read_bytes())
        time.sleep(0.5)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
        models.write_marker(out, sha256)

    monkeypatch.setattr(models, "_dequantize", slow_dequantize)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    sha256 = hashlib.sha256(b"gguf").hexdigest()
    monkeypatch.setattr(models, "_part_paths", lambda name, preset: [gguf])
    folder = tmp_path / "cache" / "models" / "m"
    convert = {
        "preset": partial(models._converted_preset, "m", Preset(("m-part1",), "1.0", sha256, 4, "m"), tmp_path / "cache"),
        "gguf": partial(models._converted, gguf, sha256, folder),
    }[source]
    with ThreadPoolExecutor(4) as pool:
        folders = [rank.result() for rank in [pool.submit(convert) for _ in range(4)]]
    assert folders == [folder] * 4 and conversions == [b"gguf"]
    assert sorted(path.name for path in folder.iterdir()) == [MARKER, "model.safetensors"]


def fake_conversions(monkeypatch, tmp_path, fail: BaseException | None = None, owner_only: bool = False) -> tuple[list, partial, Path]:
    """(the conversions run, a function converting a 4-byte GGUF into tmp_path/cache/models/m, that folder)."""
    conversions = []

    def dequantize(gguf, sha256, out):
        conversions.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"weights")
        if owner_only:  # as safetensors writes it
            (out / "model.safetensors").chmod(0o600)
        if fail is not None:
            raise fail
        models.write_marker(out, sha256)

    monkeypatch.setattr(models, "_dequantize", dequantize)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    folder = tmp_path / "cache" / "models" / "m"
    return conversions, partial(models._converted, gguf, hashlib.sha256(b"GGUF").hexdigest(), folder), folder


def test_a_conversion_on_a_full_disk_is_one_line_and_leaves_only_its_lock(monkeypatch, tmp_path):
    _, convert, folder = fake_conversions(monkeypatch, tmp_path, OSError(28, "No space left on device"))
    with pytest.raises(CrosscodersError, match=r"^cannot convert the model into .*models \(\[Errno 28\] No space left on device\); "
                                               r"free a few GB there, or set CROSSCODERS_CACHE to a writable folder$"):
        convert()
    assert [path.name for path in folder.parent.iterdir()] == [".m.lock"]


def test_a_killed_conversions_leftovers_are_cleared_and_a_cut_file_converted_again(monkeypatch, tmp_path):
    conversions, convert, folder = fake_conversions(monkeypatch, tmp_path)
    (folder.parent / ".m.k1ll3d" / "m").mkdir(parents=True)  # the temporary folder of a conversion killed with -9
    assert convert() == folder and sorted(p.name for p in folder.parent.iterdir()) == [".m.lock", "m"]
    assert convert() == folder and len(conversions) == 1  # whole: taken as it is
    (folder / "model.safetensors").write_bytes(b"wei")  # cut, under a marker that lists it whole
    assert convert() == folder and len(conversions) == 2 and (folder / "model.safetensors").read_bytes() == b"weights"
    (folder / MARKER).write_text('{"gguf_sha')
    assert convert() == folder and len(conversions) == 3


def test_a_converted_model_is_as_readable_as_any_new_file(monkeypatch, tmp_path):
    """safetensors writes its files owner-only: another user of a shared cache got a traceback."""
    conversions, convert, folder = fake_conversions(monkeypatch, tmp_path, owner_only=True)
    assert {path.stat().st_mode & 0o777 for path in convert().iterdir()} == {files.NEW_FILE_MODE}


def test_the_gguf_digest_index_is_as_readable_as_any_new_file(tmp_path):
    """Written through a temporary file, it was its owner's alone: another user of a shared cache got a traceback."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert models._gguf_sha256(tmp_path / "m.gguf", tmp_path / "cache") == hashlib.sha256(b"GGUF").hexdigest()
    assert (tmp_path / "cache" / "gguf-sha256.json").stat().st_mode & 0o777 == files.NEW_FILE_MODE


def test_a_gguf_file_that_is_not_one_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(CrosscodersError, match=r"bad.gguf does not start with GGUF's magic bytes, so it is not a GGUF file; pass"):
        load_model(str(tmp_path / "bad.gguf"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.integration
def test_the_real_0_5b_preset_generates_code():
    missing = [p for p in PRESETS[REAL_PRESET].packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        pytest.skip(f"the {REAL_PRESET} parts are not installed (missing {', '.join(missing)}); pip install '.[qwen-0-5b]'")
    loaded = load_model(REAL_PRESET)  # converts once into the default cache, later runs take seconds
    assert loaded.info.to_dict() == {
        "name": REAL_PRESET,
        "fingerprint": "gguf-sha256:" + PRESETS[REAL_PRESET].sha256,
        "d_model": 896,
        "n_layers": 24,
        "n_hidden_states": 25,
        "vocab_size": loaded.info.vocab_size,
    }
    assert loaded.info.fingerprint.startswith("gguf-sha256:1d96")
    assert loaded.tokenizer.chat_template
    shown = token_texts(loaded.tokenizer, loaded.tokenizer.encode("龘 🦜 ok"))  # byte-level: characters split over tokens
    assert shown == ["\\xe9\\xbe", "龘", " \\xf0\\x9f", "\\xa6", "🦜", " ok"], shown
    ids = loaded.tokenizer('print("Hello', return_tensors="pt").input_ids
    output = loaded.model.generate(ids, max_new_tokens=5, do_sample=False)
    text = loaded.tokenizer.decode(output[0])
    assert text.startswith('print("Hello') and '")' in text[len('print("Hello') :]
