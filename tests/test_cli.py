"""The command lines: one option per config field, same name, help and default (README, STYLE.md rule 4)."""

import dataclasses
import importlib

import pytest
import typer.main

from pipeline.cache import CacheConfig
from pipeline.corpus import CorpusConfig
from pipeline.evaluate import EvalConfig
from pipeline.features import FeaturesConfig
from pipeline.loader import LoaderConfig
from pipeline.train import TrainConfig

COMMANDS = {  # entry script -> its configs, and the options that belong to none (README says which)
    "cache_activations": ([CacheConfig, CorpusConfig], set()),
    "train_sae": ([LoaderConfig, TrainConfig], {"out", "sweep", "resume", "device"}),
    "eval_sae": ([EvalConfig], set()),
    "sae_features": ([FeaturesConfig], set()),
}


@pytest.mark.parametrize("script", COMMANDS)
def test_options_are_the_config_fields_with_their_names_help_and_defaults(script):
    classes, extra = COMMANDS[script]
    options = {p.name: p for p in typer.main.get_command(importlib.import_module(script).app).params if p.name != "help"}
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
    assert options.keys() == fields.keys() | extra
    for name, field in fields.items():
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert "--" + name.replace("_", "-") in options[name].opts
        assert options[name].help == field.metadata["help"]
        assert options[name].default == (list(default) if isinstance(default, tuple) else default), name
