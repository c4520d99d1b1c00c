"""Job configuration as data: dataclasses with the papers' defaults; YAML config files (configs/, and
a run's config.json) that set keys on top of them, the presets among them; dotted command-line
overrides (`--set train.epochs=3`); printed at job start with the keys the method reads; validated
with one-line errors.

The `method:` section is the method's own config class (models/registry.py: `method.name` → a
`MethodConfig` declared beside the method); every other section is shared by all methods, except
the keys a method declares it reads (`MethodConfig.reads`), which the other methods refuse.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from models.method import MethodConfig
from models.registry import METHODS, method_config


class ConfigError(ValueError):
    """A bad preset, flag or value: the job prints the message and exits 2."""


@dataclass
class DataConfig:
    root: str = "shards/imagenet"  # pipeline.convert output: <split>.json, shards, manifest
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    batch_size: int = 256  # per Train worker
    loaders: int = 2  # loader actors per Train worker (the decoupled path); 0 = DALI inside the worker
    loader_cpus: float = 1.0  # CPUs reserved by each loader actor
    # data.device=gpu with loader actors: the share of its Train worker's GPU each loader actor takes
    # (Ray hides the GPUs from an actor that asks for none); 0 with data.device=cpu
    loader_gpus: float = 0.0
    loader_threads: int = 2
    prefetch: int = 2  # batches in flight per loader actor
    device: str = "cpu"  # DALI device: "cpu" or "gpu" (nvJPEG decode + GPU ops)
    min_crop_scale: float | None = None  # the global views' smallest RandomResizedCrop area (None: the recipe's, 0.2)
    # multi-crop (SwAV's): this many small views per sample after the method's global ones (0: off);
    # MoCo-v2, InterCLR-MoCo / -BYOL, SimCLR and BYOL use them (models/: each method's `local_crops`)
    local_crops: int = 0
    local_size: int | None = None  # px; None: data.image_size × 96/224 (SwAV's 96 of 224)
    local_scale: tuple[float, float] = (0.05, 0.14)  # the local views' RandomResizedCrop area (SwAV's)


@dataclass
class ModelConfig:
    encoder: str = "resnet50"  # resnet18|34|50|101 or alexnet (CMC Table 10)
    width: float = 1.0
    small_images: bool = False  # 3×3 stem, no max-pool, for 28–96 px data
    shuffle_bn: bool = True  # MoCo / CACR keys: shuffle BN across workers (moco builder.py), sub-batches on one
    bn_splits: int = 8  # one worker with shuffle_bn: BN sub-batches of >= 32 rows (moco's CIFAR demo SplitBatchNorm)
    sync_bn: bool | None = None  # SyncBatchNorm under DDP on GPUs; None: the method's paper (SimCLR, BYOL: yes)
    channels_last: bool = False  # NHWC model and batches (GPU presets: tensor-core convolutions)


@dataclass
class BankConfig:
    shards: int = 2  # bank actors
    clusters: int = 10_000  # InterCLR: 10× the ImageNet classes
    min_cluster: int = 20  # online upkeep: smaller clusters dissolved, emptied ones refilled (mmselfsup InterCLR)
    labels: str = "online"  # online (relabel every update) | offline (k-means each epoch, labels fixed between)
    dtype: str = "float32"
    kmeans_iters: int = 10
    kmeans_init: str = "random"  # random (faiss's seeding, scales) | kmeans++ (C passes on rank 0: small banks)
    init: str = "extract"  # "extract": one pass of the initial encoder over the data; "random": unit noise
    gpus_per_shard: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 200
    max_steps: int | None = None  # stop early (smoke runs); schedules still span `epochs`
    # optimiser: None = the method's paper default (MethodConfig.optimizer), filled in at parse
    optimizer: str | None = None  # sgd | lars
    lr: float | None = None  # for a global batch of 256, scaled linearly
    weight_decay: float | None = None
    momentum: float | None = None
    lr_warmup_epochs: int | None = None  # at most a tenth of the epochs (SimCLR: 10 of 100)
    trust_coefficient: float | None = None  # LARS η
    exclude_bias_and_norm: bool | None = None  # biases and BN parameters: no weight decay, no LARS adaptation
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu: below 1 leaves a share of each GPU to a bank shard
    torch_threads: int | None = None  # None: Ray's default for the worker
    checkpoint_every: int = 500  # steps; every epoch end is checkpointed too
    max_failures: int = 3
    seed: int = 0
    # 32 | bf16-mixed | 16-mixed (Lightning's names; runtime.step); None: 32 on CPU, on a GPU bf16-mixed
    # where it has bfloat16, else 16-mixed
    precision: str | None = None
    log_every: int = 10  # steps per metrics.jsonl flush: losses stay on the device in between (no host sync)
    log_ids: bool = False  # each rank logs the sample ids of every step it trains (run_dir/ids/; benchmarks/chaos.py)


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_samples: int | None = None  # kNN memory from a subset of train (None: all)
    pictures: bool = True
    pixel_baseline: bool = True  # kNN on mean-centred raw pixels of the same split (off for 224 px presets)
    monitor_every: int = 0  # online kNN of the trained encoder every N epochs on the workers (0: off)
    monitor_samples: int | None = 10_000  # the monitor's kNN memory: the first N train samples (None: all)


@dataclass
class JobConfig:
    name: str = "interclr-imagenet"
    storage: str = "runs"  # RunConfig.storage_path: shared storage for a multi-node cluster
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=lambda: METHODS["interclr"]())
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """Plain JSON/YAML data (tuples as lists): what config.json holds and print_config prints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        """A run's config.json (`to_dict`). A file written before each method had its own section
        holds every method's keys: those its method does not read are dropped at their old
        defaults, or refused (`method_section`)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: SECTIONS[key](**{inner: typed(f"{key}.{inner}", v) for inner, v in value.items()})
                  if key in SECTIONS else value for key, value in d.items() if key in fields and key != "method"}
        if "method" in d:
            values["method"] = method_section(d["method"], "config.json")
        return cls(**values)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "bank": BankConfig, "train": TrainConfig,
            "eval": EvalConfig}  # and "method": the method's config class

# The `method:` section every config.json held before each method declared its own (one class for
# all methods), at its defaults: a key its method does not read at this value is what such a file
# holds, not a choice; `temperature: null` there meant the method's paper default.
OLD_METHOD_DEFAULTS = {
    "base": "npid", "num_negatives": 16_384, "strategy": "semi_hard", "weight": 0.75, "inter_margin": -0.5,
    "warmup_epochs": 0, "temperature": None, "queue_size": 65_536, "key_momentum": 0.999, "symmetric": False,
    "positives": 1, "intra_batch": True, "detach_queue_weights": True, "gather": True, "loss": "nt_xent",
    "paradigm": "core", "colorspace": "lab", "imclr": 0}


def _is_old_default(cls: type[MethodConfig], key: str, value) -> bool:
    """`method.key: value` in a file is an old config.json's filler for this method, not a setting."""
    own = {f.name for f in dataclasses.fields(cls)}
    if key in own:
        return value is None and not _kind(cls, key)[1]  # null where the method has a number: its default
    return key in OLD_METHOD_DEFAULTS and value == OLD_METHOD_DEFAULTS[key]


def _old_filler(cls: type[MethodConfig], dotted: str, value) -> bool:
    """A `method.` key of a file that `cls` lacks (another method's), or an old config.json's filler."""
    section, _, key = dotted.partition(".")
    return section == "method" and (not applies(dotted, cls) or _is_old_default(cls, key, value))


def _method_class(name: str) -> type[MethodConfig]:
    """The registered config class of method `name`; ConfigError with the choices."""
    try:
        return method_config(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None


def method_section(values: dict, where: str) -> MethodConfig:
    """The method config of a `method:` mapping (`name` picks the class)."""
    try:
        cls = _method_class(values.get("name", "interclr"))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    own = {f.name for f in dataclasses.fields(cls)}
    kept = {key: value for key, value in values.items() if not _is_old_default(cls, key, value)}
    unread = sorted(set(kept) - own)
    if unread:
        key = f"method.{unread[0]}"
        raise ConfigError(f"{where}: {key} does not apply to {cls.name} (it is {_owners(key)})")
    return cls(**{key: typed(f"method.{key}", value, cls) for key, value in kept.items()})


def applies(key: str, method: type[MethodConfig]) -> bool:
    """Whether `method` reads the dotted `key`: a `method.` key it declares, or a key of another
    section that no method declares in `reads` or that it does."""
    section, _, leaf = key.partition(".")
    if section == "method":
        return leaf in {f.name for f in dataclasses.fields(method)}
    return key in method.reads or not any(key in cls.reads for cls in METHODS.values())


def _owners(key: str) -> str:
    names = [f"{cls.title or cls.name}'s" for cls in METHODS.values() if applies(key, cls)]
    if not names:
        return "no method's"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_applicable(method: type[MethodConfig], given: dict[str, tuple[str, object]]) -> None:
    """`given`: dotted key → (where the user set it: a flag, "--set" or a file; the value). A key the
    method does not read would be silently ignored; refuse it there instead, every such key at once
    (a file may hold several). A key no method has is an unknown key, with the closest one."""
    for key in given:
        if _field_class(key, None) is None:
            raise _unknown_key(key)
    unread = {key: source for key, source in given.items() if not applies(key, method)}
    if len(unread) == 1:
        (key, (where, value)), = unread.items()
        said = (f"given by --set {key}={value}" if where == "--set" else
                f"given by {where}" if where.startswith("--") else f"set to {value} in {where}")
        raise ConfigError(f"{key} does not apply to {method.name} (it is {_owners(key)}; {said})")
    if unread:
        by_source = {}
        for key, (where, value) in unread.items():
            by_source.setdefault(where, []).append(f"{key}={value} ({_owners(key)})")
        raise ConfigError(f"{len(unread)} keys do not apply to {method.name} (remove them): "
                          + "; ".join(f"{where}: {', '.join(keys)}" for where, keys in by_source.items()))


def _flatten(tree: dict) -> dict:
    """{"name": .., "train": {"epochs": 6}} → {"name": .., "train.epochs": 6}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def defaults(method: type[MethodConfig]) -> dict:
    """Every key of a `method` job, dotted, with its default (pairs as tuples, as `typed` returns them)."""
    return _flatten(dataclasses.asdict(JobConfig(method=method())))


def _kind(cls, name: str) -> tuple[type, bool]:
    """The type of dataclass field `name` of `cls` and whether it may be None (`X | None`)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return tuple, False
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _field_class(dotted: str, method: type[MethodConfig] | None):
    """The dataclass that holds `dotted` (`method`'s section, or the first registered method's with
    the key when `method` is None), or None for a key it does not have."""
    section, _, leaf = dotted.rpartition(".")
    if not section:
        return JobConfig if leaf in ("name", "storage") else None
    if section == "method":
        candidates = [method] if method is not None else list(METHODS.values())
        return next((cls for cls in candidates if leaf in {f.name for f in dataclasses.fields(cls)}), None)
    cls = SECTIONS.get(section)
    return cls if cls is not None and leaf in {f.name for f in dataclasses.fields(cls)} else None


def _all_keys() -> list[str]:
    keys = [key for key in defaults(METHODS["interclr"]) if not key.startswith("method.")]
    return keys + sorted({f"method.{f.name}" for cls in METHODS.values() for f in dataclasses.fields(cls)})


def _unknown_key(dotted: str, method: type[MethodConfig] | None = None) -> ConfigError:
    """A key of other methods: which; else the closest valid key, one with the same last part
    (method.lr → train.lr), else difflib's."""
    if method is not None and _field_class(dotted, None) is not None:
        return ConfigError(f"{dotted} does not apply to {method.name} (it is {_owners(dotted)})")
    keys = _all_keys()
    leaf = dotted.rpartition(".")[2]
    close = [key for key in keys if key.rpartition(".")[2] == leaf] or difflib.get_close_matches(dotted, keys, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {dotted!r}{hint}")


def _pair(name: str, value) -> tuple[float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(parts, (list, tuple)) and len(parts) == 2 and not any(type(p) is bool for p in parts):
            return float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}={value!r}: expected two numbers (LOW,HIGH)")


def _convert(text: str, kind: type, optional: bool, name: str):
    if optional and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected {kind.__name__}") from None


def typed(dotted: str, value, method: type[MethodConfig] | None = None):
    """`value` as the type of the config key `dotted` (in `method`'s section; None: any method's):
    text is parsed (the command line, and YAML 1.1's `1e-4`, which it reads as a string); numbers,
    booleans and null from YAML or JSON are checked; pairs ("0.05,0.14", [0.05, 0.14]) become tuples."""
    cls = _field_class(dotted, method)
    if cls is None:
        raise _unknown_key(dotted, method)
    kind, optional = _kind(cls, dotted.rpartition(".")[2])
    if kind is tuple:
        return _pair(dotted, value)
    if dotted == "train.precision" and type(value) is int:
        value = str(value)  # `precision: 32` in YAML is Lightning's "32"
    if isinstance(value, str):
        return _convert(value, kind, optional, dotted)
    if value is None and optional:
        return None
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{dotted}={value!r}: expected {kind.__name__}")
    return value


def apply_overrides(config: JobConfig, overrides: dict) -> JobConfig:
    """Set dotted keys on `config`: `method.name` first (another method: its section at its
    defaults), then the rest, each checked against its section (a key the method lacks: ConfigError)."""
    if "method.name" in overrides:
        name = typed("method.name", overrides["method.name"])
        if name != config.method.name:
            config.method = _method_class(name)()
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        value = typed(dotted, value, type(config.method))
        setattr(getattr(config, section) if section else config, key, value)
    return config


def read_config_file(path: str | Path, method: str = "interclr") -> dict:
    """A config file as dotted overrides ({"train.epochs": 6, ...}), typed: YAML with top-level `name`,
    `storage` and sections `data:`, `model:`, `method:`, `bank:`, `train:`, `eval:`. It sets what it
    names on top of the defaults: a file of configs/ names a preset's choices, a run's config.json
    (JSON is YAML) every key. The `method:` keys are typed as the file's `method.name` (else
    `method`) has them; keys that method lacks come back as written (an old config.json holds every
    method's: `parse_args` drops those at their old defaults and refuses the rest)."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must be a mapping (name:, data:, model:, method:, bank:, train:, eval:)")
    for section in (*SECTIONS, "method"):
        if tree.get(section, {}) is None:
            tree[section] = {}  # `bank:` with nothing under it
        if not isinstance(tree.get(section, {}), dict):
            raise ConfigError(f"{path}: {section}: must be a mapping of keys, got {tree[section]!r}")
    flat = _flatten(tree)
    try:
        cls = _method_class(typed("method.name", flat.get("method.name", method)))
        return {key: value if _old_filler(cls, key, value) else typed(key, value, cls) for key, value in flat.items()}
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESET_FILES = {"imagenet": "imagenet", "imagenet22k": "imagenet22k", "webvision": "webvision",
                "demo": "fashion_mnist"}
# InterCLR's presets as dotted overrides, read from configs/interclr/ (their only source)
PRESETS = {preset: read_config_file(CONFIGS / "interclr" / f"{stem}.yaml") for preset, stem in PRESET_FILES.items()}


def preset_overrides(preset: str, method: str) -> dict:
    """`--preset` of a `method` job: configs/<method>/<dataset>.yaml where there is one, else InterCLR's
    file without the keys `method` does not read, the run named after `method`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    own = CONFIGS / method / f"{PRESET_FILES[preset]}.yaml"
    if own.is_file():
        return read_config_file(own, method)
    cls = _method_class(method)
    overrides = {key: value for key, value in PRESETS[preset].items() if applies(key, cls)}
    overrides["method.name"] = method
    overrides["name"] = overrides["name"].replace("interclr", method)
    return overrides


def resolve_optimizer(config: JobConfig) -> JobConfig:
    """Fill the optimiser fields left None with the method's paper defaults (`MethodConfig.optimizer`)."""
    paper = config.method.optimizer_defaults()
    paper["lr_warmup_epochs"] = paper.pop("warmup_epochs")
    paper.setdefault("trust_coefficient", 0.001)
    for key, value in paper.items():
        if getattr(config.train, key) is None:
            setattr(config.train, key, value)
    return config


def validate(config: JobConfig) -> JobConfig:
    from bank.shard import STRATEGIES
    from models.encoders import ENCODERS
    from runtime.step import PrecisionError, check_precision
    checks = [
        (config.data.batch_size > 0, f"data.batch_size must be positive, got {config.data.batch_size}"),
        (config.data.loaders >= 0, f"data.loaders must be >= 0, got {config.data.loaders}"),
        (config.data.device in ("cpu", "gpu"), f"data.device must be cpu or gpu, got {config.data.device!r}"),
        (0 <= config.data.loader_gpus <= 1, f"data.loader_gpus must be between 0 and 1, got {config.data.loader_gpus}"),
        (config.data.loader_gpus == 0 or (config.data.device == "gpu" and config.data.loaders > 0),
         f"data.loader_gpus={config.data.loader_gpus:g} is the GPU share of a loader actor decoding on the GPU: it "
         f"needs data.device=gpu and data.loaders > 0 (got {config.data.device} and {config.data.loaders})"),
        (0 <= config.bank.gpus_per_shard <= 1,
         f"bank.gpus_per_shard must be between 0 and 1, got {config.bank.gpus_per_shard}"),
        (config.model.encoder in (*ENCODERS, "alexnet"), f"unknown model.encoder {config.model.encoder!r}"),
        (config.bank.labels in ("online", "offline"),
         f"bank.labels must be online or offline, got {config.bank.labels!r}"),
        (config.bank.kmeans_init in ("random", "kmeans++"),
         f"bank.kmeans_init must be random or kmeans++, got {config.bank.kmeans_init!r}"),
        (config.bank.init in ("extract", "random"), f"bank.init must be extract or random, got {config.bank.init!r}"),
        (config.data.local_crops >= 0, f"data.local_crops must be >= 0, got {config.data.local_crops}"),
        (config.data.local_size is None or config.data.local_size >= 8,
         f"data.local_size must be at least 8 px, got {config.data.local_size}"),
        (0 < config.data.local_scale[0] <= config.data.local_scale[1] <= 1,
         f"data.local_scale must be LOW,HIGH with 0 < LOW <= HIGH <= 1, got {config.data.local_scale}"),
        (config.data.min_crop_scale is None or 0 < config.data.min_crop_scale <= 1,
         f"data.min_crop_scale must be in (0, 1], got {config.data.min_crop_scale}"),
        (config.train.epochs > 0, f"train.epochs must be positive, got {config.train.epochs}"),
        (config.train.num_workers > 0, f"train.num_workers must be positive, got {config.train.num_workers}"),
        (config.train.lr is None or config.train.lr > 0, f"train.lr must be positive, got {config.train.lr}"),
        (config.train.optimizer in (None, "sgd", "lars"),
         f"train.optimizer must be sgd or lars, got {config.train.optimizer!r}"),
        (config.train.log_every > 0, f"train.log_every must be positive, got {config.train.log_every}"),
        (getattr(config.method, "strategy", STRATEGIES[0]) in STRATEGIES,  # a method that samples bank negatives
         f"unknown method.strategy {getattr(config.method, 'strategy', None)!r} (choose from {', '.join(STRATEGIES)})"),
        *config.method.checks(config),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        check_precision(config.train.precision, config.train.use_gpu)
    except PrecisionError as exc:
        raise ConfigError(str(exc)) from None
    return config



class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_args(argv: list[str] | None, method: str = "interclr", default_preset: str = "imagenet",
               description: str = "") -> tuple[JobConfig, argparse.Namespace]:
    """The shared command line of every job: --preset or --config, then a few common flags, then
    --set KEY=VALUE, each on top of the one before. A key the user sets that the method does not read
    (`applies`) is refused; a preset's keys for other methods are not the user's: their `method.`
    keys are dropped (the method's section has no place for them), as are the other methods' keys an
    old run's config.json holds at their old defaults; the other sections' keep their values, unread."""
    parser = _OneLineParser(description=description)
    parser.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default: {default_preset}); "
                                         f"the files of configs/<method>/")
    parser.add_argument("--config", metavar="FILE",
                        help="a YAML config file instead of a preset: one of configs/, or a run's config.json")
    parser.add_argument("--name", help="run name (resubmitting the same name resumes it)")
    parser.add_argument("--shards", help="data.root: the pipeline.convert output folder")
    parser.add_argument("--base", help="InterCLR base: npid | moco | byol")
    parser.add_argument("--loaders", type=int, help="loader actors per Train worker (0: DALI in the worker)")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (smoke runs)")
    parser.add_argument("--storage", help="RunConfig.storage_path (shared storage on a multi-node cluster)")
    parser.add_argument("--address", help="Ray cluster address (default: the submitting cluster, or a local one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set bank.clusters=20000")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    given = {}  # key → (where the user set it, the value), for check_applicable
    if args.config is not None:
        if args.preset is not None:
            raise ConfigError("give --preset or --config, not both (a config file replaces the preset)")
        overrides = read_config_file(args.config, method)
        cls = _method_class(overrides.get("method.name", method))
        at_default = defaults(cls)
        given.update({key: (args.config, value) for key, value in overrides.items()
                      if value != at_default.get(key) and not
                      (key.startswith("method.") and _is_old_default(cls, key[len("method."):], value))})
    else:
        overrides = preset_overrides(args.preset or default_preset, method)
    flags = {"--name": ("name", args.name), "--shards": ("data.root", args.shards),
             "--base": ("method.base", args.base), "--loaders": ("data.loaders", args.loaders),
             "--workers": ("train.num_workers", args.workers), "--epochs": ("train.epochs", args.epochs),
             "--max-steps": ("train.max_steps", args.max_steps), "--storage": ("storage", args.storage)}
    for flag, (key, value) in flags.items():
        if value is not None:
            overrides[key], given[key] = value, (flag, value)
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = (part.strip() for part in item.split("=", 1))
        overrides[key], given[key] = value, ("--set", value)
    cls = _method_class(typed("method.name", overrides.get("method.name", method)))
    check_applicable(cls, given)
    # a method key the method lacks has no place: a preset's for another method, an old config.json's filler
    overrides = {key: value for key, value in overrides.items() if key in given or not _old_filler(cls, key, value)}
    config = apply_overrides(JobConfig(method=cls()), overrides)
    validate(config)
    resolve_optimizer(config)
    return config, args


def method_view(config: JobConfig) -> dict:
    """config.to_dict() without the keys its method does not read (and sections left empty)."""
    view = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            value = {inner: v for inner, v in value.items() if applies(f"{key}.{inner}", type(config.method))}
            if not value:
                continue
        view[key] = value
    return view


def print_config(config: JobConfig, stream=None) -> None:
    """The keys the method reads, as YAML in the config files' layout (save it and pass it back with
    --config); the run's config.json holds every key."""
    print(yaml.safe_dump(method_view(config), sort_keys=False, default_flow_style=False).rstrip(),
          file=stream or sys.stdout, flush=True)
