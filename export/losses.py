"""Siamese losses and one training epoch per loss (`station train`, `station fit`)."""

from __future__ import annotations

import numpy as np
import torch

from export.augment import augment
from export.dataset import mean_crop, model_batch

MARGIN = 1.0
PAIRS_PER_IMAGE = 2  # contrastive pairs drawn per training image per epoch


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, similar: torch.Tensor, margin: float = MARGIN):
    """similar * d^2 + (1 - similar) * max(0, margin - d)^2, averaged."""
    # eps keeps the gradient of sqrt finite when two embeddings coincide.
    distance = torch.sqrt(torch.sum((first - second) ** 2, dim=1) + 1e-9)
    return torch.mean(similar * distance**2 + (1 - similar) * torch.clamp(margin - distance, min=0) ** 2)


def center_loss(good: torch.Tensor, defect: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Contrastive loss against the batch's MEAN GOOD EMBEDDING, the station's reference.

    good parts: d^2 to the mean; defects: max(0, margin - d)^2. The station
    scores a part by its distance to the mean good embedding, so this trains
    exactly the distance the verdict uses (pairs of single parts only
    approximate it).
    """
    center = good.mean(dim=0, keepdim=True)
    d_good = torch.sqrt(torch.sum((good - center) ** 2, dim=1) + 1e-9)
    d_defect = torch.sqrt(torch.sum((defect - center) ** 2, dim=1) + 1e-9)
    return torch.mean(d_good**2) + torch.mean(torch.clamp(margin - d_defect, min=0) ** 2)


# ---- one epoch per loss --------------------------------------------------------------------


def _batches(n_items: int, batch_size: int) -> int:
    return max(1, -(-n_items // batch_size))


def _center_epoch(model, optimizer, goods, negatives, n_items, spec, config, rng, bar, recipe):
    """Balanced batches (half good, half negative), as many images as the training set."""
    n_good = config.batch_size // 2
    for _ in range(_batches(n_items, config.batch_size)):
        g = goods[rng.integers(0, len(goods), n_good)]
        d = negatives.draw(config.batch_size - n_good, rng)
        x = torch.from_numpy(model_batch(augment(np.concatenate([g, d]), rng, config.allow_flips, recipe), spec))
        embeddings = model(x)
        _step(optimizer, center_loss(embeddings[:n_good], embeddings[n_good:]), bar)


def _contrastive_epoch(model, optimizer, goods, negatives, n_items, spec, config, rng, bar, recipe):
    """Pairs whose first part is good: half good-good (similar), half good-negative."""
    half = config.batch_size // 2
    for _ in range(_batches(PAIRS_PER_IMAGE * n_items, config.batch_size)):
        first = goods[rng.integers(0, len(goods), config.batch_size)]
        second = np.concatenate(
            [goods[rng.integers(0, len(goods), half)], negatives.draw(config.batch_size - half, rng)]
        )
        similar = torch.from_numpy((np.arange(config.batch_size) < half).astype(np.float32))
        both = augment(np.concatenate([first, second]), rng, config.allow_flips, recipe)
        # One forward over both halves: the twins share weights, so this is the Siamese pair.
        embeddings = model(torch.from_numpy(model_batch(both, spec)))
        n = config.batch_size
        _step(optimizer, contrastive_loss(embeddings[:n], embeddings[n:], similar), bar)


def _triplet_epoch(model, optimizer, goods, negatives, n_items, spec, config, rng, bar, recipe):
    anchor = torch.from_numpy(model_batch(mean_crop(goods)[None], spec))
    criterion = torch.nn.TripletMarginLoss(margin=MARGIN)
    half = config.batch_size // 2
    for _ in range(_batches(n_items, half)):
        p = goods[rng.integers(0, len(goods), half)]
        pn = augment(np.concatenate([p, negatives.draw(half, rng)]), rng, config.allow_flips, recipe)
        embeddings = model(torch.cat([anchor, torch.from_numpy(model_batch(pn, spec))]))
        loss = criterion(embeddings[:1].expand(half, -1), embeddings[1 : 1 + half], embeddings[1 + half :])
        _step(optimizer, loss, bar)


EPOCHS = {"center": _center_epoch, "contrastive": _contrastive_epoch, "triplet": _triplet_epoch}


def _step(optimizer, loss: torch.Tensor, bar):
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
