"""runtime/config.py in-process: config files and presets, the keys each method reads, and bad input as
one-line ConfigErrors before anything starts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from models.registry import METHODS
from runtime.config import (PRESET_FILES, PRESETS, ConfigError, JobConfig, applies, method_view,
                            parse_args, print_config, read_config_file)


@pytest.mark.parametrize("method,sets,message", [
    ("simclr", ["method.loss=triplet"], "method.loss must be one of nt_xent, align_uniform, hard_negative, cmc"),
    ("moco", ["method.loss=cmc"], "method.loss does not apply to moco (it is SimCLR's; given by --set"),
    ("simclr", ["method.positives=4"], "more than one positive is SimCLR's with method.loss=cmc"),
    ("interclr", ["bank.labels=sometimes"], "bank.labels must be online or offline, got 'sometimes'"),
    ("interclr", ["bank.kmeans_init=forgy"], "bank.kmeans_init must be random or kmeans++, got 'forgy'"),
])
def test_bad_values_are_one_line_config_errors(method, sets, message):
    argv = ["--preset", "demo"] + [arg for item in sets for arg in ("--set", item)]
    with pytest.raises(ConfigError) as error:
        parse_args(argv, method=method, default_preset="demo")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_multi_view_cl_and_offline_labels_are_accepted():
    config, _ = parse_args(["--preset", "demo", "--set", "method.loss=cmc", "--set", "method.positives=4"],
                           method="simclr", default_preset="demo")
    assert (config.method.loss, config.method.positives) == ("cmc", 4)
    config, _ = parse_args(["--preset", "demo", "--set", "bank.labels=offline"], default_preset="demo")
    assert config.bank.labels == "offline"


# --- config files (configs/, a run's config.json) and the keys each method reads ------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OTHER_METHODS = [m for m in METHODS if m != "interclr"]


def build(*argv: str, method: str = "interclr") -> JobConfig:
    return parse_args(list(argv), method=method, default_preset="demo")[0]


def one_line_error(*argv: str, method: str = "interclr") -> str:
    with pytest.raises(ConfigError) as error:
        build(*argv, method=method)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("preset,stem", PRESET_FILES.items())
def test_each_preset_is_read_from_its_interclr_config_file(preset, stem):
    path = CONFIGS / "interclr" / f"{stem}.yaml"
    assert PRESETS[preset] == read_config_file(path)
    assert build("--preset", preset) == build("--config", str(path))


def test_the_demo_file_holds_the_demo_settings():
    demo = build("--config", str(CONFIGS / "interclr" / "fashion_mnist.yaml"))
    assert (demo.name, demo.method.base, demo.method.queue_size, demo.bank.clusters, demo.train.epochs) == \
        ("demo", "moco", 4096, 100, 6)
    assert demo.train.weight_decay == 0.0005 and demo.data.min_crop_scale == 0.5


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_a_methods_demo_file_is_the_interclr_demo_without_the_keys_it_does_not_read(method):
    path = CONFIGS / method / "fashion_mnist.yaml"
    expected = {key: value for key, value in PRESETS["demo"].items() if applies(key, METHODS[method])}
    assert read_config_file(path) == {**expected, "method.name": method}
    assert build("--preset", "demo", method=method) == build("--config", str(path), method=method)
    # every key the method reads is what the InterCLR demo gave this method before the files
    before = build("--preset", "demo", "--set", f"method.name={method}")
    assert method_view(build("--preset", "demo", method=method)) == method_view(before)


def test_config_file_then_flags_then_set():
    config = build("--config", str(CONFIGS / "simclr" / "fashion_mnist.yaml"), "--epochs", "2", "--workers", "3",
                   "--set", "train.num_workers=4", "--set", "method.temperature=0.2", method="moco")
    assert (config.method.name, config.data.image_size) == ("simclr", 28)  # the file's
    assert (config.train.epochs, config.train.num_workers, config.method.temperature) == (2, 4, 0.2)
    assert config.data.prefetch == JobConfig().data.prefetch  # a key no file names: the default


def test_preset_and_config_together_is_an_error():
    assert one_line_error("--preset", "demo", "--config", str(CONFIGS / "moco" / "fashion_mnist.yaml")) == \
        "give --preset or --config, not both (a config file replaces the preset)"


@pytest.mark.parametrize("method,argv", [
    *[(method, ["--preset", "demo"]) for method in METHODS],
    ("simclr", ["--preset", "imagenet", "--max-steps", "9"]),  # LARS wd 1e-06: YAML 1.1 reads it as text
    ("interclr", ["--preset", "imagenet22k", "--base", "byol", "--set", "model.sync_bn=false"]),
])
def test_a_runs_config_json_given_back_by_config_is_the_same_config(tmp_path, method, argv):
    config = build(*argv, method=method)
    saved = config.to_dict()
    assert saved["train"]["lr"] is not None and saved["train"]["max_steps"] in (None, 9)  # resolved and None values
    (tmp_path / "config.json").write_text(json.dumps(saved, indent=1))  # as runtime/driver.py writes it
    assert build("--config", str(tmp_path / "config.json"), method=method).to_dict() == saved


def test_print_config_output_is_a_config_file_of_the_same_run(tmp_path, capsys):
    config = build("--preset", "demo", "--set", "method.loss=align_uniform", method="simclr")
    print_config(config)
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out)
    assert build("--config", str(tmp_path / "mine.yaml"), method="simclr") == config


def test_print_config_of_simclr_shows_simclrs_keys_only(capsys):
    print_config(build("--preset", "demo", method="simclr"))
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown["method"]) == {"name", "temperature", "gather", "loss", "positives"}
    assert "bank" not in shown and "shuffle_bn" not in shown["model"]
    print_config(build("--preset", "demo"))
    shown = yaml.safe_load(capsys.readouterr().out)
    assert {"base", "num_negatives", "queue_size"} <= set(shown["method"]) and shown["bank"]["clusters"] == 100


@pytest.mark.parametrize("method,argv,message", [
    ("simclr", ["--base", "moco"], "method.base does not apply to simclr (it is InterCLR's; given by --base)"),
    ("simclr", ["--set", "method.num_negatives=512"], "method.num_negatives does not apply to simclr "
     "(it is NPID's, CMC's and InterCLR's; given by --set method.num_negatives=512)"),
    ("moco", ["--set", "bank.clusters=50"], "bank.clusters does not apply to moco (it is InterCLR's"),
    ("npid", ["--set", "method.queue_size=64"], "method.queue_size does not apply to npid (it is MoCo's, "
     "CACR's and InterCLR's"),
    ("cacr", ["--set", "method.temperature=0.1"], "method.temperature does not apply to cacr"),
    ("byol", ["--set", "model.shuffle_bn=false"], "model.shuffle_bn does not apply to byol"),
    ("interclr", ["--set", "method.imclr=2"], "method.imclr does not apply to interclr"),
])
def test_a_key_the_method_does_not_read_is_a_one_line_error(method, argv, message):
    assert one_line_error("--preset", "demo", *argv, method=method).startswith(message)


def test_a_config_file_key_the_method_does_not_read_is_an_error_unless_at_its_default(tmp_path):
    path = tmp_path / "simclr.yaml"
    path.write_text("method:\n  name: simclr\n  base: npid\n  num_negatives: 16384\n")  # the defaults: harmless
    assert build("--config", str(path)).method.name == "simclr"
    path.write_text("method:\n  name: simclr\n  base: moco\n")
    assert one_line_error("--config", str(path)) == \
        f"method.base does not apply to simclr (it is InterCLR's; set to moco in {path})"
    path.write_text("method:\n  name: simclr\n  base: moco\nbank:\n  clusters: 100\n")
    assert one_line_error("--config", str(path), "--set", "method.imclr=2") == (
        f"3 keys do not apply to simclr (remove them): {path}: method.base=moco (InterCLR's), "
        f"bank.clusters=100 (InterCLR's); --set: method.imclr=2 (supervised ImCLR's)")


def test_a_presets_keys_for_other_methods_are_not_the_users():
    # benchmarks/fidelity.py: the InterCLR demo, then --set method.name; its InterCLR keys are dropped
    config = build("--preset", "demo", "--set", "method.name=simclr", "--set", "method.temperature=0.19")
    assert (config.method.name, config.method.temperature) == ("simclr", 0.19)
    assert not hasattr(config.method, "base") and config.data.image_size == 28  # the preset's shared keys stay


@pytest.mark.parametrize("argv,message", [
    (["--set", "method.num_negative=512"], "unknown config key 'method.num_negative' "
                                           "(did you mean method.num_negatives?)"),
    (["--set", "method.lr=0.1"], "unknown config key 'method.lr' (did you mean train.lr?)"),
    (["--set", "trian.epochs=3"], "unknown config key 'trian.epochs' (did you mean train.epochs?)"),
    (["--set", "colour=red"], "unknown config key 'colour'"),
])
def test_an_unknown_key_names_the_closest_valid_one(argv, message):
    assert one_line_error("--preset", "demo", *argv) == message


@pytest.mark.parametrize("text,message", [
    ("train:\n  epoch: 3\n", "unknown config key 'train.epoch' (did you mean train.epochs?)"),
    ("train:\n  epochs: many\n", "train.epochs='many': expected int"),
    ("train:\n  use_gpu: 1\n", "train.use_gpu=1: expected bool"),
    ("train: 3\n", "train: must be a mapping of keys, got 3"),
    ("train:\n  epochs: [3\n", "is not valid YAML"),
])
def test_a_bad_config_file_is_a_one_line_error_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    error = one_line_error("--config", str(path))
    assert error.startswith(str(path)) and message in error


def test_imclr_job_takes_n_from_the_config_file_unless_given(tmp_path):
    spec = importlib.util.spec_from_file_location("imclr_job", CONFIGS.parent / "jobs" / "imclr.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    path = str(CONFIGS / "supervised" / "fashion_mnist.yaml")
    plain = build(*job.driver_argv(["--config", path]), method="supervised")
    imclr3 = build(*job.driver_argv(["--config", path, "--imclr", "3", "--name", "imclr3"]), method="supervised")
    assert (plain.name, plain.method.imclr, imclr3.name, imclr3.method.imclr) == ("demo", 0, "imclr3", 3)


# --- a run's config.json from before each method had its own section ------------------------------

# what runtime/driver.py wrote for a MoCo run when one `method:` section held every method's keys
OLD_MOCO_METHOD = {"name": "moco", "base": "npid", "num_negatives": 16384, "strategy": "semi_hard", "weight": 0.75,
                   "inter_margin": -0.5, "warmup_epochs": 0, "temperature": None, "queue_size": 4096,
                   "key_momentum": 0.99, "symmetric": False, "positives": 1, "intra_batch": True,
                   "detach_queue_weights": True, "gather": True, "loss": "nt_xent", "paradigm": "core",
                   "colorspace": "lab", "imclr": 0}


def old_config_json(tmp_path, **method) -> Path:
    saved = build("--preset", "demo", method="moco").to_dict()
    saved["method"] = {**OLD_MOCO_METHOD, **method}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved, indent=1))
    return path


def test_an_old_runs_config_json_still_reads_as_the_same_moco_config(tmp_path):
    path = old_config_json(tmp_path)
    expected = build("--preset", "demo", method="moco")  # τ null was "the paper's": MoCo's 0.2
    assert (expected.method.temperature, expected.method.queue_size) == (0.2, 4096)
    assert build("--config", str(path), method="moco") == expected
    assert JobConfig.from_dict(json.loads(path.read_text())) == expected  # what resume and export read


def test_an_old_config_json_with_another_methods_key_set_is_a_one_line_error(tmp_path):
    path = old_config_json(tmp_path, base="moco")
    assert one_line_error("--config", str(path), method="moco") == \
        f"method.base does not apply to moco (it is InterCLR's; set to moco in {path})"
    with pytest.raises(ConfigError, match="config.json: method.base does not apply to moco"):
        JobConfig.from_dict(json.loads(path.read_text()))
