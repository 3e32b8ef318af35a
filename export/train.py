"""`station train` / `station fit`: fit a Siamese trunk on good parts and negatives.

contrastive: good-good pairs pulled within the margin, good-defect pairs
             pushed beyond it (margin 1, Hadsell et al.)
triplet:     anchor = the MEAN IMAGE of the good training parts, positive =
             a good part, negative = a defect (margin 1)
center:      (default) contrastive against the MEAN GOOD EMBEDDING of each
             balanced batch: good parts pulled to it, defects pushed beyond
             the margin (1, on unit-length embeddings) -- the very distance
             the station's verdict uses.

Negatives are the real defects, plus synthetic anomalies drawn on good crops
(export/synthetic.py) when real defects are few, or alone when there are none.

Model selection: every EVAL_EVERY epochs the held-out validation part is
scored as the station scores it -- Minkowski p=4 to the mean embedding of the
TRAINING goods -- and the epoch with the best criterion (AUROC of val
negatives against val goods, less a little of the escape rate at the
threshold that rejects 1 % of val goods) is kept; training stops after
`patience` epochs without improvement. Val negatives are val's real defects,
else synthetic anomalies drawn on val goods.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from station.core.version import __version__
from station.core.errors import ConfigError
from station.core.imagefolder import LabeledImage, dataset_fingerprint, image_digest, scan_dataset
from station.core.metrics import minkowski
from export.augment import AUGMENTATIONS
from export.losses import EPOCHS, MARGIN
from export.dataset import (
    CropSet,
    auroc,
    fit_threshold,
    load_crops,
    model_batch,
    require_goods,
    sample_pairs,
    stratified_split,
)
from export.synthetic import SYNTHETIC_CLASS, SYNTHETIC_MODES, Negatives, synthesize
from export.trunk import Ensemble, build_trunk, count_parameters, input_spec_for, save_checkpoint, trunk_options

log = logging.getLogger(__name__)

# ---- defaults in one place, chosen on held-out parts only (never a test split): the measurements that chose
# them are in docs/model.md, "Generalization (issue 15)".
DEFAULT_ARCH = "cnn"
DEFAULT_LOSS = "center"
DEFAULT_EPOCHS = {"mlp": 100, "cnn": 60, "lite0": 10, "lite0ft": 10}  # the most; early stopping usually ends sooner
DEFAULT_SEED = 0
DEFAULT_EMBEDDING_DIM = 128
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DEFAULT_WEIGHT_DECAY = 1e-4  # AdamW (decoupled); 1e-3 and 1e-5 measured the same within noise
DEFAULT_PATIENCE = 30  # epochs without a better validation criterion
DEFAULT_AUGMENTATION = "light"
# The pretrained trunk's backbone is frozen: its features of the same crops are computed once and
# reused every epoch (export/trunk.py), which augmentation would defeat; ImageNet features are
# already robust to small shifts and light.
ARCH_AUGMENTATION = {"lite0": "none", "lite0ft": "none"}
# An ensemble: DEFAULT_MEMBERS trunks from seeds seed, seed+1, ..., their unit embeddings concatenated
# (scaled to unit length) in one exported model. One trunk's quality is a lottery of its seed (tiles,
# cnn/center, four seeds on the same parts: judged AUROC 0.968 / 0.985 / 0.958 / 0.993); three
# together measured 0.983, four 0.988 (docs/fit.md). Costs three trainings and ~3x the trunk's time per part.
DEFAULT_MEMBERS = 3  # export/augment.py: shifts of 2 px, light +-10 %, noise
# A pretrained trunk is one member: its backbone is the same ImageNet network in every member, so
# members would differ by their small heads only, for three times the backbone's cost per part.
ARCH_MEMBERS = {"lite0": 1, "lite0ft": 1}
# A fine-tuned backbone stage learns at this share of the head's rate: adjusted by a few hundred photos,
# not overwritten (ImageNet's weights are what make it worth more than a trunk trained from scratch).
BACKBONE_LR_SHARE = 0.1


def parameter_groups(model: torch.nn.Module, learning_rate: float) -> list[dict]:
    """What trains, and how fast: a pretrained backbone's fine-tuned blocks at BACKBONE_LR_SHARE of the
    rate (export/trunk.py: FineTunedTrunk), the rest at the full rate; frozen weights not at all."""
    backbone, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(parameter)
    groups = [{"params": rest}]
    if backbone:
        groups.append({"params": backbone, "lr": learning_rate * BACKBONE_LR_SHARE})
    return groups


def default_members(arch: str) -> int:
    return ARCH_MEMBERS.get(arch, DEFAULT_MEMBERS)


def augmentation_of(config) -> str:
    return config.augmentation or ARCH_AUGMENTATION.get(config.arch, DEFAULT_AUGMENTATION)


EVAL_EVERY = 5  # epochs between validation scorings
VAL_FRACTION = 0.15
EVAL_PAIRS = 2000  # fixed pairs for the threshold (train) and the accuracy (val)
LOSSES = ("contrastive", "triplet", "center")
# station fit trains its candidates on one torch thread: the trunks are small, and on a busy 2-core
# machine two threads stall each other (cnn, 10 epochs, 480 parts, load ~5: 1 thread 4.3 s, 2: 30.8 s).
TORCH_THREADS = 1
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_SCHEDULE = "cosine"
# Synthetic anomalies: modes and shares in export/synthetic.py (Negatives).
VAL_REJECT_RATE = 0.01  # the escape rate is read at the threshold rejecting 1 % of val goods
ESCAPE_WEIGHT = 0.1  # criterion = AUROC - ESCAPE_WEIGHT * escape rate
TIES_TO_LATER = True  # an equal criterion later (often a saturated 1.0) keeps the later, more settled weights
MAX_REFERENCE_GOODS = 512  # training goods embedded for the validation reference
MIN_VAL_NEGATIVES = 100  # synthetic val negatives drawn when val has no defects


@dataclass(frozen=True)
class TrainConfig:
    arch: str = DEFAULT_ARCH
    loss: str = DEFAULT_LOSS
    epochs: int | None = None  # None: DEFAULT_EPOCHS of the arch (the most, with early stopping)
    seed: int = DEFAULT_SEED
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    allow_flips: bool = False
    batch_size: int = BATCH_SIZE
    learning_rate: float = LEARNING_RATE
    lr_schedule: str = DEFAULT_LR_SCHEDULE
    trunk_options: dict | None = None  # None: DEFAULT_TRUNK_OPTIONS of export/trunk.py
    input_size: tuple[int, int] | None = None  # (width, height); None: the arch's 36 x 26
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    patience: int | None = DEFAULT_PATIENCE  # epochs; None: no early stopping (still keeps the best)
    synthetic_anomalies: str = "auto"
    augmentation: str | None = None  # None: ARCH_AUGMENTATION of the arch, else DEFAULT_AUGMENTATION
    members: int = DEFAULT_MEMBERS  # trunks trained from different seeds, exported as one model

    def __post_init__(self):
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS.get(self.arch, 1))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    def check(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"unknown learning-rate schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}"
            )
        if self.synthetic_anomalies not in SYNTHETIC_MODES:
            raise ConfigError(
                f"unknown synthetic-anomaly mode {self.synthetic_anomalies!r}: "
                f"choose one of {', '.join(SYNTHETIC_MODES)}"
            )
        if self.augmentation is not None and self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augmentation!r}: choose one of {', '.join(AUGMENTATIONS)}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be at least 1")
        if self.members < 1:
            raise ConfigError(f"--members {self.members} must be at least 1")
        if self.batch_size < 2:
            raise ConfigError(f"batch size {self.batch_size} must be at least 2")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay {self.weight_decay} must not be negative")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience {self.patience} must be at least 1 epoch")
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 4):
            raise ConfigError(f"input size {self.input_size} must be (width, height), each at least 4 pixels")

    def spec(self):
        if self.input_size is None:
            return input_spec_for(self.arch)
        return input_spec_for(self.arch, *self.input_size)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    val_pair_accuracy: float
    pair_threshold: float
    train_seconds: float
    n_train: int
    n_val: int
    parameters: int
    val_auroc: float | None = None
    val_escape_rate: float | None = None
    best_epoch: int = 0  # 1-based epoch whose weights were kept
    epochs_run: int = 0
    val_negatives: str = "defects"  # "defects" or "synthetic"


def make_deterministic(seed: int):
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError as exc:  # not every build supports it; say so, don't fail
        log.warning("deterministic algorithms unavailable: %s", exc)


def embed_crops(model, crops: np.ndarray, spec, batch_size: int = 512) -> np.ndarray:
    """Embeddings of un-augmented crops, in eval mode."""
    model.eval()
    with torch.no_grad():
        chunks = [
            model(torch.from_numpy(model_batch(crops[i : i + batch_size], spec))).numpy()
            for i in range(0, len(crops), batch_size)
        ]
    return np.concatenate(chunks) if chunks else np.empty((0, 0), np.float32)


# ---- held-out figures ----------------------------------------------------------------------


def held_out_figures(model, spec, reference_goods, val_goods, val_negatives) -> tuple[float, float]:
    """(AUROC, escape rate at the threshold rejecting VAL_REJECT_RATE of val goods), Minkowski p=4
    to the mean embedding of the training goods: the station's own score."""
    center = embed_crops(model, reference_goods, spec).mean(axis=0)
    good = minkowski(embed_crops(model, val_goods, spec), center, p=4)
    negative = minkowski(embed_crops(model, val_negatives, spec), center, p=4)
    threshold = np.quantile(good, 1.0 - VAL_REJECT_RATE)
    return auroc(good, negative), float(np.mean(negative <= threshold))


def pair_figures(model, spec, train_pairs: CropSet, val_pairs: CropSet, rng) -> tuple[float, float]:
    """(val pair accuracy, threshold fitted on training pairs): the figure `station train` prints."""

    def distances(crop_set):
        first, second, similar = sample_pairs(crop_set.is_defect, EVAL_PAIRS, rng)
        emb = embed_crops(model, crop_set.crops, spec)
        return np.linalg.norm(emb[first] - emb[second], axis=1), similar

    threshold = fit_threshold(*distances(train_pairs))
    val_distances, similar = distances(val_pairs)
    return float(np.mean((val_distances < threshold) == similar.astype(bool))), threshold


def _with_negatives(goods: np.ndarray, negatives: np.ndarray) -> CropSet:
    crops = np.concatenate([goods, negatives])
    classes = np.array(["good"] * len(goods) + [SYNTHETIC_CLASS] * len(negatives))
    return CropSet(crops, classes, [])


# ---- entry points --------------------------------------------------------------------------


def train_split(
    train: list[LabeledImage],
    val: list[LabeledImage],
    out: Path,
    config: TrainConfig,
    progress: bool = False,
    data_root: Path | None = None,
) -> TrainResult:
    """Train on `train`, choose the epoch on `val` (the caller's held-out part), write `out`.

    Goods alone are enough: synthetic anomalies are the negatives then. `val`
    may have no defects (synthetic ones are drawn on its goods) and may be
    empty (15 % of `train` is held out instead).
    """
    config.check()
    spec = config.spec()
    train_set = load_crops(list(train), spec, progress)
    val_set = load_crops(list(val), spec, progress) if val else load_crops([], spec)
    make_deterministic(config.seed)
    # Separate streams: changing the epoch count must not change the split or the val negatives.
    split_rng, train_rng, eval_rng, val_rng = (np.random.default_rng([config.seed, k]) for k in range(4))
    if int(np.sum(~val_set.is_defect)) < 2:
        train_idx, val_idx = stratified_split(train_set.classes, VAL_FRACTION, split_rng)
        train_set, val_set = train_set.subset(train_idx), val_set.join(train_set.subset(val_idx))
    require_goods(train_set, "training")
    require_goods(val_set, "validation")
    negatives = Negatives(train_set.crops, train_set.is_defect, config.synthetic_anomalies)
    goods = negatives.goods
    val_goods = val_set.crops[~val_set.is_defect]
    val_negatives, val_kind = val_set.crops[val_set.is_defect], "defects"
    if len(val_negatives) == 0:
        val_negatives = synthesize(val_goods, max(MIN_VAL_NEGATIVES, len(val_goods)), val_rng)
        val_kind = "synthetic"
    reference = goods[np.sort(val_rng.permutation(len(goods))[:MAX_REFERENCE_GOODS])]

    options = trunk_options(config.trunk_options)
    started = time.perf_counter()
    context = _MemberContext(
        config,
        spec,
        options,
        goods,
        negatives,
        len(train_set.crops),
        reference,
        val_goods,
        val_negatives,
        train_rng,
        progress,
    )
    members = [_train_member(context, index) for index in range(config.members)]
    train_seconds = time.perf_counter() - started
    first = members[0]
    model, val_auroc, escape = first.model, first.val_auroc, first.escape
    if len(members) > 1:  # the ensemble is judged as the station will judge it
        model = Ensemble([member.model for member in members]).eval()
        val_auroc, escape = held_out_figures(model, spec, reference, val_goods, val_negatives)
    best_epoch, epochs_run, history = first.best_epoch, first.epochs_run, first.history

    pair_negatives = negatives.defects if len(negatives.defects) else synthesize(goods, len(goods), eval_rng)
    val_accuracy, threshold = pair_figures(
        model, spec, _with_negatives(goods, pair_negatives), _with_negatives(val_goods, val_negatives), eval_rng
    )
    items = sorted(list(train) + list(val), key=lambda item: Path(item.path))
    fingerprint, data_path = _provenance(items, data_root)
    save_checkpoint(
        out,
        model,
        config.arch,
        config.embedding_dim * config.members,
        spec,
        trunk_options=options,
        members=config.members,
        member_best_epochs=[m.best_epoch for m in members],
        lr_schedule=config.lr_schedule,
        loss=config.loss,
        epochs=config.epochs,
        seed=config.seed,
        allow_flips=config.allow_flips,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        margin=MARGIN,
        weight_decay=config.weight_decay,
        patience=config.patience,
        augmentation=augmentation_of(config),
        synthetic_anomalies=config.synthetic_anomalies,
        synthetic_share=negatives.share,
        data_fingerprint=fingerprint,
        data_path=data_path,
        n_train=len(train_set.crops),
        n_val=len(val_set.crops),
        n_train_defects=len(negatives.defects),
        val_negatives=val_kind,
        val_pair_accuracy=val_accuracy,
        pair_threshold=threshold,
        val_auroc=val_auroc,
        val_escape_rate=escape,
        best_epoch=best_epoch,
        epochs_run=epochs_run,
        val_history=history,
        train_seconds=round(train_seconds, 2),
        station_version=__version__,
        trained_on=sorted({image_digest(item.path) for item in train_set.items}),  # calibration sets these aside
    )
    return TrainResult(
        Path(out),
        val_accuracy,
        threshold,
        train_seconds,
        len(train_set.crops),
        len(val_set.crops),
        count_parameters(model),
        val_auroc,
        escape,
        best_epoch,
        epochs_run,
        val_kind,
    )


@dataclass(frozen=True)
class _MemberContext:
    """What every member of an ensemble trains and is judged on: the same parts, the same val slice."""

    config: TrainConfig
    spec: object
    options: dict
    goods: np.ndarray
    negatives: Negatives
    n_items: int
    reference: np.ndarray
    val_goods: np.ndarray
    val_negatives: np.ndarray
    first_rng: np.random.Generator  # member 0's stream: a one-member model trains as it always did
    progress: bool


@dataclass
class _Member:
    model: torch.nn.Module
    best_epoch: int
    epochs_run: int
    history: list
    val_auroc: float | None
    escape: float | None


def _train_member(context: _MemberContext, index: int) -> _Member:
    """One trunk, its epoch chosen on the val slice; member k starts from seed + k."""
    config, spec = context.config, context.spec
    rng = context.first_rng
    if index:  # members differ only by their initial weights and batches
        torch.manual_seed(config.seed + index)
        rng = np.random.default_rng([config.seed + index, 1])
    model = build_trunk(config.arch, config.embedding_dim, spec, context.options)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.learning_rate), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = None
    if config.lr_schedule == "cosine":
        # Large steps first, small ones last: the final weights settle instead of jittering.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    recipe, run_epoch = AUGMENTATIONS[augmentation_of(config)], EPOCHS[config.loss]
    best = (-np.inf, None, 0, None, None)  # criterion, state, epoch, auroc, escape
    history, epochs_run = [], 0
    name = f"train {config.arch}/{config.loss}" + (f" {index + 1}/{config.members}" if config.members > 1 else "")
    with tqdm(range(config.epochs), desc=name, unit="epoch", disable=not context.progress) as bar:
        for epoch in bar:
            model.train()
            run_epoch(
                model, optimizer, context.goods, context.negatives, context.n_items, spec, config, rng, bar, recipe
            )
            if scheduler is not None:
                scheduler.step()
            epochs_run = epoch + 1
            if epochs_run % EVAL_EVERY and epochs_run != config.epochs:
                continue
            val_auroc, escape = held_out_figures(
                model, spec, context.reference, context.val_goods, context.val_negatives
            )
            criterion = val_auroc - ESCAPE_WEIGHT * escape
            history.append([epochs_run, round(val_auroc, 5), round(escape, 5)])
            if criterion > best[0] or (TIES_TO_LATER and criterion == best[0]):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (criterion, state, epochs_run, val_auroc, escape)
            elif config.patience is not None and epochs_run - best[2] >= config.patience:
                break
    _, state, best_epoch, val_auroc, escape = best
    if state is not None:  # None only when every scoring was NaN: keep the last weights
        model.load_state_dict(state)
    return _Member(model.eval(), best_epoch, epochs_run, history, val_auroc, escape)


def _provenance(items: list[LabeledImage], data_root: Path | None) -> tuple[str, str]:
    """(fingerprint, data_path) of the images a model saw; data_path is where export finds samples."""
    if data_root is None:
        return "", ""
    for root in (Path(data_root), Path(data_root).resolve()):
        try:
            return dataset_fingerprint(items, root), str(Path(data_root).resolve())
        except ValueError:  # an image outside this spelling of data_root
            continue
    return "", str(Path(data_root).resolve())


def train(data_dir: Path, out: Path, config: TrainConfig = TrainConfig(), progress: bool = True) -> TrainResult:
    """`station train`: a stratified VAL_FRACTION of the folder is held out for validation."""
    config.check()
    data_dir = Path(data_dir).resolve()
    items = scan_dataset(data_dir)
    classes = np.array([item.defect_class for item in items])
    train_idx, val_idx = stratified_split(classes, VAL_FRACTION, np.random.default_rng([config.seed, 0]))
    return train_split([items[i] for i in train_idx], [items[i] for i in val_idx], out, config, progress, data_dir)
