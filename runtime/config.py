"""Job configuration as data: dataclasses with the papers' defaults, named presets, dotted
command-line overrides (`--set train.epochs=3`), printed at job start, validated with one-line errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field


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
    loader_threads: int = 2
    prefetch: int = 2  # batches in flight per loader actor
    device: str = "cpu"  # DALI device: "cpu" or "gpu" (nvJPEG decode + GPU ops)
    min_crop_scale: float | None = None  # RandomResizedCrop's smallest area fraction (None: the recipe's, 0.2)


@dataclass
class ModelConfig:
    encoder: str = "resnet50"  # resnet18|34|50|101 or alexnet (CMC Table 10)
    width: float = 1.0
    small_images: bool = False  # 3×3 stem, no max-pool, for 28–96 px data
    shuffle_bn: bool = True  # MoCo / CACR keys: shuffle BN across workers (moco builder.py), sub-batches on one
    bn_splits: int = 8  # one worker with shuffle_bn: BN sub-batches of >= 32 rows (moco's CIFAR demo SplitBatchNorm)
    sync_bn: bool | None = None  # SyncBatchNorm under DDP on GPUs; None: the method's paper (SimCLR, BYOL: yes)


@dataclass
class MethodConfig:
    name: str = "interclr"  # simclr|npid|moco|byol|cmc|cacr|interclr|supervised
    base: str = "npid"  # InterCLR base: npid|moco|byol
    num_negatives: int = 16_384
    strategy: str = "semi_hard"  # InterCLR negatives: hard|semi_hard|random|semi_easy
    weight: float = 0.75  # λ of Eq. 7
    inter_margin: float = -0.5
    warmup_epochs: int = 0  # InterCLR: intra only for these epochs, then k-means on the bank and both branches
    temperature: float | None = None  # None: the method's paper default
    queue_size: int = 65_536  # MoCo / CACR-MoCo
    key_momentum: float = 0.999  # MoCo key encoder m
    symmetric: bool = False  # MoCo / InterCLR-MoCo: both views in turn are the query (mmselfsup's symmetric MoCo-v2)
    positives: int = 1  # CACR K
    intra_batch: bool = True  # CACR queue form: the batch's other queries as negatives (official code's default)
    detach_queue_weights: bool = True  # CACR queue form: the queue's softmax weights without gradient (official code)
    gather: bool = True  # SimCLR: NT-Xent over the global batch (every worker's embeddings)
    loss: str = "nt_xent"  # SimCLR: nt_xent | align_uniform (AU-CL) | hard_negative (HN-CL) | cmc (multi-view CL)
    paradigm: str = "core"  # CMC with more than two channel groups
    colorspace: str = "lab"  # CMC: lab|ydbdr
    imclr: int = 0  # supervised: ImCLR's samples per input, side by side (0: one image per input)


@dataclass
class BankConfig:
    shards: int = 2  # bank actors
    clusters: int = 10_000  # InterCLR: 10× the ImageNet classes
    min_cluster: int = 20  # online upkeep: smaller clusters dissolved, emptied ones refilled (mmselfsup InterCLR)
    labels: str = "online"  # InterCLR pseudo-labels: online (every update) | offline (k-means each epoch, fixed between)
    dtype: str = "float32"
    kmeans_iters: int = 10
    init: str = "extract"  # "extract": one pass of the initial encoder over the data; "random": unit noise
    gpus_per_shard: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 200
    max_steps: int | None = None  # stop early (smoke runs); schedules still span `epochs`
    # optimiser: None = the method's paper default (runtime.optim.OPTIMIZER_DEFAULTS), filled in at parse
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
    torch_threads: int | None = None  # None: Ray's default for the worker
    checkpoint_every: int = 500  # steps; every epoch end is checkpointed too
    max_failures: int = 3
    seed: int = 0


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_samples: int | None = None  # kNN memory from a subset of train (None: all)
    pictures: bool = True
    pixel_baseline: bool = True  # kNN on mean-centred raw pixels of the same split (off for 224 px presets)


@dataclass
class JobConfig:
    name: str = "interclr-imagenet"
    storage: str = "runs"  # RunConfig.storage_path: shared storage for a multi-node cluster
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: SECTIONS[key](**value) if key in SECTIONS else value
                      for key, value in d.items() if key in fields})


SECTIONS = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "bank": BankConfig,
            "train": TrainConfig, "eval": EvalConfig}


PRESETS = {
    # InterCLR Sect. 5.1.2: ResNet-50, batch 256 over 4 GPUs, 200 epochs, 10k clusters
    "imagenet": {"name": "interclr-imagenet", "data.root": "shards/imagenet", "data.batch_size": 64, "eval.pixel_baseline": False,
                 "data.device": "gpu", "train.num_workers": 4, "train.use_gpu": True, "bank.shards": 4},
    # 14.2M images: 1/10 of the epochs (CACR App. C.2); more clusters, fp16 bank on 8 shards
    "imagenet22k": {"name": "interclr-imagenet22k", "data.root": "shards/imagenet22k", "data.batch_size": 64, "eval.pixel_baseline": False,
                    "data.device": "gpu", "train.num_workers": 8, "train.use_gpu": True, "train.epochs": 20,
                    "bank.shards": 8, "bank.clusters": 50_000, "bank.dtype": "float16"},
    # 2.4M images: 1/2 of the epochs (CACR App. C.2)
    "webvision": {"name": "interclr-webvision", "data.root": "shards/webvision", "data.batch_size": 64, "eval.pixel_baseline": False,
                  "data.device": "gpu", "train.num_workers": 4, "train.use_gpu": True, "train.epochs": 100,
                  "bank.shards": 4, "bank.clusters": 10_000},
    # Fashion-MNIST (make demo): MoCo-v2-InterCLR (README's demo section: no setting measured here did
    # better beyond one seed), ResNet-18 ×0.5, CPU, a loader actor; about 8 minutes on 2 cores
    "demo": {"name": "demo", "data.root": "data/fashion-mnist-demo", "data.image_size": 28, "data.batch_size": 256,
             "data.min_crop_scale": 0.5, "data.loaders": 1, "data.loader_cpus": 0.5, "data.loader_threads": 1,
             "model.encoder": "resnet18", "model.width": 0.5, "method.base": "moco", "method.queue_size": 4096,
             "method.key_momentum": 0.99, "method.num_negatives": 1024, "method.warmup_epochs": 1,
             "bank.shards": 2, "bank.clusters": 100, "bank.kmeans_iters": 10, "bank.init": "random",
             "train.epochs": 6, "train.weight_decay": 5e-4, "train.num_workers": 1,
             "train.cpus_per_worker": 1.5, "train.torch_threads": 2, "train.checkpoint_every": 100,
             "train.max_failures": 2},
}


_OPTIONAL_TYPES = {"train.optimizer": str, "train.lr": float, "train.weight_decay": float, "train.momentum": float,
                   "train.lr_warmup_epochs": int, "train.trust_coefficient": float,
                   "train.exclude_bias_and_norm": bool, "data.min_crop_scale": float, "train.max_steps": int, "train.torch_threads": int, "model.sync_bn": bool,
                   "method.temperature": float, "eval.knn_train_samples": int}


def _convert(text: str, current, name: str):
    kind = _OPTIONAL_TYPES.get(name, type(current))
    if name in _OPTIONAL_TYPES and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected {kind.__name__}") from None


def apply_overrides(config: JobConfig, overrides: dict) -> JobConfig:
    for dotted, value in overrides.items():
        target, key = config, dotted
        if "." in dotted:
            section, key = dotted.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in {dotted!r} "
                                  f"(sections: {', '.join(SECTIONS)})")
            target = getattr(config, section)
        if not hasattr(target, key) or dataclasses.is_dataclass(getattr(target, key)):
            raise ConfigError(f"unknown config key {dotted!r}")
        setattr(target, key, _convert(value, getattr(target, key), dotted) if isinstance(value, str) else value)
    return config


def resolve_optimizer(config: JobConfig) -> JobConfig:
    """Fill the optimiser fields left None with the method's paper defaults (runtime.optim)."""
    from runtime.optim import optimizer_defaults
    defaults = optimizer_defaults(config.method.name, config.method.base)
    defaults["lr_warmup_epochs"] = defaults.pop("warmup_epochs")
    defaults.setdefault("trust_coefficient", 0.001)
    for key, value in defaults.items():
        if getattr(config.train, key) is None:
            setattr(config.train, key, value)
    return config


def validate(config: JobConfig) -> JobConfig:
    from bank.shard import STRATEGIES
    from models.encoders import ENCODERS
    from models.interclr import BASES
    from models.simclr import LOSSES as SIMCLR_LOSSES
    checks = [
        (config.data.batch_size > 0, f"data.batch_size must be positive, got {config.data.batch_size}"),
        (config.data.loaders >= 0, f"data.loaders must be >= 0, got {config.data.loaders}"),
        (config.data.device in ("cpu", "gpu"), f"data.device must be cpu or gpu, got {config.data.device!r}"),
        (config.model.encoder in (*ENCODERS, "alexnet"), f"unknown model.encoder {config.model.encoder!r}"),
        (config.method.name in METHOD_NAMES,
         f"unknown method {config.method.name!r} (choose from {', '.join(METHOD_NAMES)})"),
        (config.method.base in BASES,
         f"--base must be {', '.join(BASES[:-1])} or {BASES[-1]}, got {config.method.base!r}"),
        (config.method.strategy in STRATEGIES, f"unknown method.strategy {config.method.strategy!r}"),
        (config.method.imclr == 0 or config.method.imclr >= 2,
         f"method.imclr (--imclr) is 0 (plain supervised) or the samples per input, >= 2; got {config.method.imclr}"),
        (config.method.loss in SIMCLR_LOSSES,
         f"method.loss must be one of {', '.join(SIMCLR_LOSSES)}, got {config.method.loss!r}"),
        (config.method.loss == "nt_xent" or config.method.name == "simclr",
         f"method.loss={config.method.loss} is a SimCLR loss (CACR's CL baselines); method is {config.method.name}"),
        (config.method.positives == 1 or config.method.name == "cacr" or
         (config.method.name == "simclr" and config.method.loss == "cmc"),
         f"method.positives={config.method.positives}: more than one positive is CACR's, or SimCLR's with "
         f"method.loss=cmc (multi-view CL)"),
        (config.bank.labels in ("online", "offline"),
         f"bank.labels must be online or offline, got {config.bank.labels!r}"),
        (config.bank.init in ("extract", "random"), f"bank.init must be extract or random, got {config.bank.init!r}"),
        (config.data.min_crop_scale is None or 0 < config.data.min_crop_scale <= 1,
         f"data.min_crop_scale must be in (0, 1], got {config.data.min_crop_scale}"),
        (config.train.epochs > 0, f"train.epochs must be positive, got {config.train.epochs}"),
        (config.train.num_workers > 0, f"train.num_workers must be positive, got {config.train.num_workers}"),
        (config.train.lr is None or config.train.lr > 0, f"train.lr must be positive, got {config.train.lr}"),
        (config.train.optimizer in (None, "sgd", "lars"),
         f"train.optimizer must be sgd or lars, got {config.train.optimizer!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return config


METHOD_NAMES = ("simclr", "npid", "moco", "byol", "cmc", "cacr", "interclr", "supervised")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def parse_args(argv: list[str] | None, method: str = "interclr", default_preset: str = "imagenet",
               description: str = "") -> tuple[JobConfig, argparse.Namespace]:
    """The shared command line of every job: --preset, a few common flags, and --set KEY=VALUE."""
    parser = _OneLineParser(description=description)
    parser.add_argument("--preset", default=default_preset, help=f"one of {', '.join(PRESETS)}")
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
    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r} (choose from {', '.join(PRESETS)})")
    config = JobConfig()
    config.method.name = method
    overrides = dict(PRESETS[args.preset])
    if args.preset != "demo" and method != "interclr":
        overrides["name"] = overrides["name"].replace("interclr", method)
    flags = {"name": args.name, "data.root": args.shards, "method.base": args.base, "data.loaders": args.loaders,
             "train.num_workers": args.workers, "train.epochs": args.epochs, "train.max_steps": args.max_steps,
             "storage": args.storage}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    from models.interclr import BASES
    config = apply_overrides(config, overrides)
    if config.method.name in METHOD_NAMES and config.method.base in BASES:  # else validate says which is unknown
        resolve_optimizer(config)
    return validate(config), args


def print_config(config: JobConfig, stream=None) -> None:
    print(json.dumps(config.to_dict(), indent=1), file=stream or sys.stdout, flush=True)
