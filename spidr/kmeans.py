"""K-means on frame features: k-means++ seeding, Lloyd or mini-batch iterations, a small file format.

Command line (``python -m spidr.kmeans --help`` lists every option)::

    python -m spidr.kmeans features/ kmeans_l6_k256.pt --k 256 --layer 6 --max-frames 1000000

Python::

    model = fit_kmeans(x, 256, seed=0)      # x: (N, D) frames, any float dtype
    labels = model.predict(frames)          # (T,) int64
    save_kmeans(model, "km.pt"); model = load_kmeans("km.pt")

How it works (N frames, D features, K centroids):

- The data are fitted as one float32 copy with their mean subtracted (k-means does not depend on
  the origin, and float32 distances lose less precision near it); the centroids are shifted back.
- Seeding: k-means++ (D^2 sampling): the first centre is a uniformly drawn frame, each next one a
  frame drawn with probability proportional to its squared distance to the nearest centre so far.
  Only the distances to the newest centre are computed at each step (one (N, D) x (D,) product) and
  folded into a running minimum. All draws come from a ``torch.Generator`` seeded by ``seed``.
- Full batch (default): every iteration assigns all frames with :func:`spidr.ops.assign_codes`
  (the fused kernel: no (N, K) matrix, ties to the lowest index) and moves every centroid to the mean
  of its frames, from segment sums (:func:`spidr.ops.codebook_update_` with decay 0, or
  ``index_add_``/``bincount`` when ``torch.distributed`` is initialised, so that no all-reduce runs).
- Mini-batch (``batch_size``): Sculley (2010), "Web-scale k-means clustering": frames are visited in
  mini-batches; each centroid keeps the number of frames it has absorbed, ``v``, and moves toward each
  of its frames with learning rate ``1 / v`` (for a batch: ``c += (S - m c) / (v + m)`` with ``m``
  frames summing to ``S``). In this mode one *iteration* is one pass over the data in shuffled
  mini-batches (a fresh seeded permutation per pass).
- Empty clusters are re-seeded deterministically: a centroid with no frame (in full batch: at this
  iteration; in mini-batch: during a whole pass) moves onto the frame farthest from its own centroid
  (the next farthest for the next empty cluster, ties to the lowest frame index; in mini-batch mode
  among the pass's last batch, and its count restarts at 0).
- Inertia is the sum over frames of the squared distance to the assigned centroid. During the
  iterations it is computed from the segment sums, with no (N, K) or (N, D) temporary:
  ``sum ||x||^2 - 2 sum_k c_k . S_k + sum_k n_k ||c_k||^2`` in float64. The reported (final) value is
  recomputed exactly from the frames and their assigned centroids, in row blocks.
- Stopping: after ``iters`` iterations, when the relative change of the inertia between two
  iterations drops below ``tol``, or (full batch) when no label changes any more (a fixed point).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spidr import ops

__all__ = [
    "FORMAT",
    "FeatureFileError",
    "KMeans",
    "KMeansFileError",
    "fit_kmeans",
    "kmeans_plusplus",
    "load_kmeans",
    "load_layer_features",
    "main",
    "save_kmeans",
]

logger = logging.getLogger(__name__)

FORMAT = "spidr.kmeans/1"
FEATURES_FORMAT = "spidr.extract/1"

# Rows per block where a (rows, D) temporary is needed (exact inertia, farthest frames): about 16 MB at D=768.
_BLOCK_ROWS = 4096


class KMeansFileError(ValueError):
    """A k-means file is missing, is not a k-means file, or holds wrong keys, shapes or dtypes."""


class FeatureFileError(ValueError):
    """A feature file (written by ``spidr.extract``) is missing, unreadable or lacks what is asked."""


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous: compare fields explicitly
class KMeans:
    """A fitted k-means model.

    Attributes:
        centroids: (k, D) float32 tensor (on the CPU after :func:`fit_kmeans` and :func:`load_kmeans`).
        inertia: sum over the fitted frames of the squared distance to their nearest centroid.
        iterations: the number of iterations run (full-batch updates, or mini-batch passes).
        layer: the 1-based model layer the features came from, or None when unknown.
        seed: the seed of the k-means++ draws (and mini-batch shuffles).
        frames: the number of frames fitted.
        model: the name of the model that produced the features, or None when unknown.
    """

    centroids: Tensor
    inertia: float
    iterations: int
    layer: int | None
    seed: int
    frames: int
    model: str | None = None

    @property
    def k(self) -> int:
        """The number of centroids."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """The feature dimension D."""
        return int(self.centroids.shape[1])

    def predict(self, x: Tensor) -> Tensor:
        """Index of the nearest centroid (squared L2) for every frame.

        Args:
            x: (T, D) frames, any float dtype, on any device (computed in float32 on that device by
                :func:`spidr.ops.assign_codes`; ties go to the lowest index).

        Returns:
            (T,) int64 labels in [0, k), on x's device.

        Raises:
            ValueError: x is not 2-D, or its D differs from the centroids'.
            TypeError: x is not a floating-point tensor.
        """
        _check_frames("x", x, self.dim, "the centroids have")
        centroids = self.centroids.to(device=x.device, dtype=torch.float32)
        return _assign(x, centroids)

    def inertia_of(self, x: Tensor) -> float:
        """Sum over the frames of ``x`` of the squared distance to their nearest centroid.

        Args:
            x: (T, D) frames, any float dtype (computed in float32, summed in float64).

        Raises:
            ValueError, TypeError: as :meth:`predict`.
        """
        labels = self.predict(x)
        return _exact_inertia(x, self.centroids.to(device=x.device, dtype=torch.float32), labels)


# ----------------------------------------------------------------------------------------------------------------
# Checks


def _check_frames(name: str, x: object, dim: int | None = None, against: str = "") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (frames, features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {str(x.dtype).removeprefix('torch.')}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features per frame but {against} {dim}")
    return x


def _check_finite(name: str, x: Tensor) -> None:
    # Row norms are one cheap pass with no (N, D) temporary; a NaN or infinite value makes its row's norm non-finite.
    norms = torch.linalg.vector_norm(x, dim=1)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or infinite values, or values too large to square (first at row {row})")


def _check_k(k: object, frames: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    if k > frames:
        raise ValueError(f"k={k} is more than the number of frames ({frames}): need at least k frames")
    return k


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (work on float32 data)


def _assign(x: Tensor, centroids: Tensor) -> Tensor:
    """(N,) int64 labels of x (N, D) against centroids (K, D) float32, through the fused op."""
    ones = torch.ones((1, centroids.shape[0]), dtype=torch.float32, device=centroids.device)
    return ops.assign_codes(x.unsqueeze(0), centroids.unsqueeze(0), ones)[0]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per cluster: frame count (K,) and frame sum (K, D), float32, by a segmented sum (no one-hot)."""
    counts = torch.zeros((1, k), dtype=torch.float32, device=x.device)
    sums = torch.zeros((1, k, x.shape[1]), dtype=torch.float32, device=x.device)
    if _distributed():
        # codebook_update_ would sum over the ranks; k-means here is local to the process.
        counts[0] = torch.bincount(labels, minlength=k).to(torch.float32)
        sums[0].index_add_(0, labels, x)
    else:
        # With decay 0 the EMA update writes the plain segment sums into the zeroed buffers (clusters with
        # no frame keep their zeros), with the fastest backend of the ops seam.
        ops.codebook_update_(sums, counts, x.unsqueeze(0), labels.unsqueeze(0), 0.0)
    return counts[0], sums[0]


def _inertia_from_sums(centroids: Tensor, counts: Tensor, sums: Tensor, sum_sq: Tensor) -> float:
    """``sum ||x||^2 - 2 sum_k c_k . S_k + sum_k n_k ||c_k||^2`` in float64 (the frames' inertia)."""
    c = centroids.double()
    value = sum_sq - 2.0 * (c * sums.double()).sum() + (counts.double() * c.square().sum(1)).sum()
    return max(float(value), 0.0)


def _exact_inertia(x: Tensor, centroids: Tensor, labels: Tensor) -> float:
    """Sum of ``||x_i - c_{label_i}||^2`` from the frames themselves, in row blocks, summed in float64."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    buffer = torch.empty((min(_BLOCK_ROWS, x.shape[0]), x.shape[1]), dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        block = x[start : start + _BLOCK_ROWS]
        diff = buffer[: block.shape[0]]
        torch.index_select(centroids, 0, labels[start : start + _BLOCK_ROWS], out=diff)
        diff.sub_(block)
        total += torch.linalg.vector_norm(diff, dim=1).square_().sum(dtype=torch.float64)
    return float(total)


def _distances_to_assigned(x: Tensor, centroids: Tensor, labels: Tensor) -> Tensor:
    """(N,) float32 squared distance of each frame to its assigned centroid, in row blocks."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        out[rows] = (x[rows] - centroids.index_select(0, labels[rows])).square().sum(1)
    return out


def _farthest(x: Tensor, centroids: Tensor, labels: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` frames farthest from their assigned centroid, ties to the lowest index."""
    distances = _distances_to_assigned(x, centroids, labels)
    order = torch.sort(distances, descending=True, stable=True).indices
    return order[:count]


def _row_sq_norms(x: Tensor) -> Tensor:
    """(N,) float32 squared L2 norm of every row (a reduction, no (N, D) temporary)."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def _plusplus_indices(
    x: Tensor, sq_norms: Tensor, k: int, generator: torch.Generator, shift: Tensor | None = None
) -> Tensor:
    """k-means++ (D^2 sampling): (k,) int64 indices of the chosen frames of x (N, D) float32.

    Distances are computed for ``x - shift`` when ``shift`` (D,) is given (``sq_norms`` must then be the
    norms of the shifted rows): ``(x - s) . (c - s) = x . (c - s) - s . (c - s)``, with no shifted copy.
    """
    n = x.shape[0]
    chosen = torch.empty(k, dtype=torch.int64)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    min_sq = torch.full((n,), math.inf, dtype=torch.float32, device=x.device)
    for i in range(1, k):
        centre = x[int(chosen[i - 1])].float()
        if shift is not None:
            centre = centre - shift
            dots = torch.mv(x, centre) - torch.dot(shift, centre)
        else:
            dots = torch.mv(x, centre)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, folded into the running minimum over the centres so far.
        distances = dots.mul_(-2.0).add_(sq_norms).add_(centre.square().sum()).clamp_min_(0.0)
        torch.minimum(min_sq, distances, out=min_sq)
        min_sq.index_fill_(0, chosen[:i].to(x.device), 0.0)
        cumulative = min_sq.double().cumsum_(0)
        total = float(cumulative[-1])
        draw = float(torch.rand((), dtype=torch.float64, generator=generator))
        if total > 0.0 and math.isfinite(total):
            target = torch.tensor([draw * total], dtype=torch.float64, device=x.device)
            index = int(torch.searchsorted(cumulative, target, right=True)[0])
            chosen[i] = min(index, n - 1)
        else:
            # Every frame coincides with a centre already chosen (fewer distinct frames than k).
            chosen[i] = min(int(draw * n), n - 1)
    return chosen


def kmeans_plusplus(x: Tensor, k: int, *, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling) of ``k`` centroids among the frames of ``x``.

    The first centroid is a uniformly drawn frame; each next one is a frame drawn with probability
    proportional to its squared distance to the nearest centroid chosen so far (when all of those
    distances are 0, uniformly). Each step computes the distances to the newest centroid only and folds
    them into a running minimum: k matrix-vector products over x in all. Distances are taken about
    the data's mean, without copying x.

    Args:
        x: (N, D) frames, float32 (other float dtypes are converted to a float32 copy), on any device.
        k: the number of centroids, 1 <= k <= N.
        generator: a CPU ``torch.Generator``: the same generator state gives the same centroids.

    Returns:
        (k, D) float32 centroids (copies of frames of x), on x's device.

    Raises:
        ValueError: x not 2-D, NaN or infinite values in x, k < 1 or k > N.
        TypeError: x not a floating-point tensor.
    """
    x = _check_frames("x", x)
    _check_k(k, x.shape[0])
    _check_finite("x", x)
    x = x.float()
    mean = _mean_of(x)
    sq_norms = _centred_sq_norms(x, mean)
    indices = _plusplus_indices(x, sq_norms, k, generator, shift=mean)
    return x.index_select(0, indices.to(x.device)).clone()


def _mean_of(x: Tensor) -> Tensor:
    """(D,) float32 mean of the rows, as one matrix-vector product (the fit only needs it approximately:
    it is the origin the distances are computed about)."""
    ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.mv(x.t(), ones).float().div_(x.shape[0])


def _centred_sq_norms(x: Tensor, mean: Tensor) -> Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        out[start : start + _BLOCK_ROWS] = _row_sq_norms(x[start : start + _BLOCK_ROWS] - mean)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fitting


@dataclass
class _Data:
    """The fitted data: ``work`` = x - mean (N, D) float32 contiguous, the mean (D,) float64, row norms."""

    work: Tensor
    mean: Tensor
    sq_norms: Tensor
    sum_sq: Tensor  # float64 scalar: sum of sq_norms


def _prepare(x: Tensor, *, owned: bool = False) -> _Data:
    """Centre x into a float32 working copy (in place when ``owned`` and x is float32 and contiguous)."""
    mean = _mean_of(x)
    if owned and x.dtype == torch.float32 and x.is_contiguous():
        work = x.sub_(mean)
    else:
        work = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for start in range(0, x.shape[0], _BLOCK_ROWS * 4):
            rows = slice(start, start + _BLOCK_ROWS * 4)
            torch.sub(x[rows], mean, out=work[rows])
    sq_norms = _row_sq_norms(work)
    sum_sq = sq_norms.sum(dtype=torch.float64)
    if not bool(torch.isfinite(sum_sq)):
        row = int((~torch.isfinite(sq_norms)).nonzero()[0, 0])
        raise ValueError(f"x has values too large for float32 squared distances (first at row {row})")
    return _Data(work=work, mean=mean.double(), sq_norms=sq_norms, sum_sq=sum_sq)


@dataclass
class _Step:
    """One assignment of all frames: labels (N,), per-cluster counts (K,) and sums (K, D), the inertia."""

    labels: Tensor
    counts: Tensor
    sums: Tensor
    inertia: float


def _lloyd_assign(data: _Data, centroids: Tensor) -> _Step:
    """Assignment half of a Lloyd iteration: labels, segment sums and the inertia of ``centroids``."""
    labels = _assign(data.work, centroids)
    counts, sums = _cluster_sums(data.work, labels, centroids.shape[0])
    return _Step(labels, counts, sums, _inertia_from_sums(centroids, counts, sums, data.sum_sq))


def _lloyd_update(data: _Data, centroids: Tensor, step: _Step) -> tuple[Tensor, int]:
    """Update half: the means of the clusters; empty clusters re-seeded on the farthest frames.

    Returns the new (K, D) centroids and the number of re-seeded clusters.
    """
    filled = step.counts > 0
    new = torch.where(filled.unsqueeze(1), step.sums / step.counts.clamp_min(1.0).unsqueeze(1), centroids)
    empty = (~filled).nonzero().flatten()
    if empty.numel():
        frames = _farthest(data.work, centroids, step.labels, empty.numel())
        new[empty[: frames.numel()]] = data.work.index_select(0, frames)
    return new, int(empty.numel())


def _progress_bar(total: int, enabled: bool, desc: str, unit: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm ships with the train/eval extras only
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _converged(previous: float, current: float, tol: float) -> bool:
    if previous <= 0.0:
        return True
    return abs(previous - current) / previous < tol


def _fit_full_batch(data: _Data, centroids: Tensor, iters: int, tol: float, bar: Any) -> tuple[Tensor, float, int]:
    step = _lloyd_assign(data, centroids)
    done = 0
    for _ in range(iters):
        centroids, reseeded = _lloyd_update(data, centroids, step)
        if reseeded:
            logger.info("k-means: re-seeded %d empty cluster(s) at iteration %d", reseeded, done + 1)
        previous = step
        step = _lloyd_assign(data, centroids)
        done += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{step.inertia:.6g}")
        if torch.equal(step.labels, previous.labels) and not reseeded:
            break  # a fixed point: the next update would give the same centroids
        if _converged(previous.inertia, step.inertia, tol):
            break
    return centroids, _exact_inertia(data.work, centroids, step.labels), done


def _fit_mini_batch(
    data: _Data, centroids: Tensor, iters: int, tol: float, batch_size: int, generator: torch.Generator, bar: Any
) -> tuple[Tensor, float, int]:
    n, k = data.work.shape[0], centroids.shape[0]
    device = data.work.device
    absorbed = torch.zeros(k, dtype=torch.float64, device=device)  # v: frames each centroid has absorbed
    centroids = centroids.clone()
    previous = math.inf
    done = 0
    for _ in range(iters):
        order = torch.randperm(n, generator=generator).to(device)
        seen = torch.zeros(k, dtype=torch.float64, device=device)
        pass_inertia = 0.0
        batch = order[:0]
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            xb = data.work.index_select(0, batch)
            labels = _assign(xb, centroids)
            counts, sums = _cluster_sums(xb, labels, k)
            pass_inertia += _inertia_from_sums(centroids, counts, sums, data.sq_norms[batch].sum(dtype=torch.float64))
            # Sculley's per-centre learning rate 1/v, applied to the batch at once: c += (S - m c) / (v + m).
            absorbed += counts.double()
            rate = (1.0 / absorbed.clamp_min(1.0)).float().unsqueeze(1)
            centroids += (sums - counts.unsqueeze(1) * centroids) * rate
            seen += counts.double()
        done += 1
        empty = (seen == 0).nonzero().flatten()
        if empty.numel():
            xb = data.work.index_select(0, batch)
            frames = _farthest(xb, centroids, _assign(xb, centroids), empty.numel())
            centroids[empty[: frames.numel()]] = xb.index_select(0, frames)
            absorbed[empty] = 0.0
            logger.info("k-means: re-seeded %d empty cluster(s) after pass %d", empty.numel(), done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(inertia=f"{pass_inertia:.6g}")
        if not empty.numel() and math.isfinite(previous) and _converged(previous, pass_inertia, tol):
            break
        previous = pass_inertia
    labels = _assign(data.work, centroids)
    return centroids, _exact_inertia(data.work, centroids, labels), done


def _check_options(iters: object, seed: object, batch_size: object, tol: object) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got iters={iters!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got seed={seed!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got batch_size={batch_size!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got tol={tol!r}")


def fit_kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 100,
    seed: int = 0,
    batch_size: int | None = None,
    tol: float = 1e-4,
    init: Tensor | None = None,
    progress: bool = False,
) -> KMeans:
    """Fit k-means to the frames of ``x``: k-means++ seeding, then Lloyd (or mini-batch) iterations.

    See the module docstring for the algorithm, the re-seeding of empty clusters and the stopping rule.
    Memory: one float32 copy of x (centred), plus per-frame vectors.

    Args:
        x: (N, D) frames, any float dtype, on any device (computed there, in float32).
        k: the number of centroids, 1 <= k <= N.
        iters: the most iterations to run (>= 0); in mini-batch mode, passes over the data.
        seed: seeds the k-means++ draws (and the mini-batch shuffles).
        batch_size: None for full-batch Lloyd; otherwise mini-batch k-means with this many frames per batch.
        tol: stop when the relative change of the inertia between two iterations is below this (>= 0).
        init: (k, D) initial centroids, replacing k-means++.
        progress: show a tqdm bar over the iterations (when tqdm is installed).

    Returns:
        A :class:`KMeans` with (k, D) float32 centroids on the CPU, the final inertia (exact, of the
        returned centroids), the iterations run, ``frames=N``, ``seed``, and ``layer=None``.

    Raises:
        ValueError: x not 2-D, NaN or infinite values in x or init, k < 1, k > N, init of the wrong shape,
            or a bad iters, seed, batch_size or tol (each message names the argument and its value).
        TypeError: x or init not a floating-point tensor.
    """
    x = _check_frames("x", x)
    return _fit(x, k, iters=iters, seed=seed, batch_size=batch_size, tol=tol, init=init, progress=progress)


def _fit(
    x: Tensor,
    k: int,
    *,
    iters: int,
    seed: int,
    batch_size: int | None,
    tol: float,
    init: Tensor | None,
    progress: bool,
    owned: bool = False,
) -> KMeans:
    """:func:`fit_kmeans` after the check of x; ``owned=True`` lets it centre a float32 x in place."""
    _check_k(k, x.shape[0])
    _check_options(iters, seed, batch_size, tol)
    if init is not None:
        _check_frames("init", init, x.shape[1], "x has")
        if init.shape[0] != k:
            raise ValueError(f"init must have shape (k={k}, D={x.shape[1]}), got {tuple(init.shape)}")
        _check_finite("init", init)
    _check_finite("x", x)
    data = _prepare(x, owned=owned)
    generator = torch.Generator().manual_seed(seed)
    if init is None:
        indices = _plusplus_indices(data.work, data.sq_norms, k, generator)
        centroids = data.work.index_select(0, indices.to(data.work.device))
    else:
        centroids = (init.to(device=x.device, dtype=torch.float64) - data.mean).float()
    bar = _progress_bar(iters, progress, "k-means", "it" if batch_size is None else "pass")
    try:
        if batch_size is None:
            centroids, inertia, done = _fit_full_batch(data, centroids, iters, float(tol), bar)
        else:
            centroids, inertia, done = _fit_mini_batch(data, centroids, iters, float(tol), batch_size, generator, bar)
    finally:
        if bar is not None:
            bar.close()
    centroids = (centroids.double() + data.mean).float().cpu().contiguous()
    return KMeans(centroids=centroids, inertia=inertia, iterations=done, layer=None, seed=seed, frames=x.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# File format


def save_kmeans(model: KMeans, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``).

    The file is a ``torch.save`` dict: ``{"format": "spidr.kmeans/1", "centroids": (k, D) float32,
    "layer": int | None, "k": int, "inertia": float, "iterations": int, "seed": int, "frames": int,
    "model": str | None}``.

    Raises:
        OSError: the folder does not exist or cannot be written (the temporary file is removed).
    """
    path = Path(path)
    content = {
        "format": FORMAT,
        "centroids": model.centroids.detach().to(device="cpu", dtype=torch.float32).contiguous().clone(),
        "layer": model.layer,
        "k": model.k,
        "inertia": float(model.inertia),
        "iterations": int(model.iterations),
        "seed": int(model.seed),
        "frames": int(model.frames),
        "model": model.model,
    }
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


_INT_KEYS = ("k", "iterations", "seed", "frames")


def load_kmeans(path: str | os.PathLike[str]) -> KMeans:
    """Read a k-means file written by :func:`save_kmeans` (``torch.load(..., weights_only=True)``).

    Returns:
        The :class:`KMeans`, centroids (k, D) float32 on the CPU.

    Raises:
        KMeansFileError: (a ValueError) naming the file and the problem: no such file, not a k-means
            file (unreadable, not a dict, wrong ``format``), a missing key, or a wrong type, shape or dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise KMeansFileError(f"{path}: no such k-means file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors have no common base class
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KMeansFileError(f"{path}: not a k-means file (torch.load failed: {first})") from error
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise KMeansFileError(f"{path}: not a k-means file (expected format {FORMAT!r}, found {found!r})")
    missing = [key for key in ("centroids", "layer", *_INT_KEYS, "inertia", "model") if key not in content]
    if missing:
        raise KMeansFileError(f"{path}: missing key(s) {', '.join(missing)}")
    centroids = content["centroids"]
    if not isinstance(centroids, Tensor) or centroids.dim() != 2 or centroids.dtype != torch.float32:
        what = (
            f"{str(centroids.dtype).removeprefix('torch.')} tensor of shape {tuple(centroids.shape)}"
            if isinstance(centroids, Tensor)
            else type(centroids).__name__
        )
        raise KMeansFileError(f"{path}: 'centroids' must be a 2-D float32 tensor (k, D), got a {what}")
    if centroids.shape[0] < 1 or centroids.shape[1] < 1:
        raise KMeansFileError(f"{path}: 'centroids' is empty, shape {tuple(centroids.shape)}")
    for key in _INT_KEYS:
        if isinstance(content[key], bool) or not isinstance(content[key], int):
            raise KMeansFileError(f"{path}: {key!r} must be an int, got {content[key]!r}")
    if content["k"] != centroids.shape[0]:
        raise KMeansFileError(f"{path}: 'k' is {content['k']} but 'centroids' has {centroids.shape[0]} rows")
    layer = content["layer"]
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise KMeansFileError(f"{path}: 'layer' must be an int or None, got {layer!r}")
    inertia = content["inertia"]
    if isinstance(inertia, bool) or not isinstance(inertia, int | float):
        raise KMeansFileError(f"{path}: 'inertia' must be a number, got {inertia!r}")
    if content["model"] is not None and not isinstance(content["model"], str):
        raise KMeansFileError(f"{path}: 'model' must be a str or None, got {content['model']!r}")
    if not bool(torch.isfinite(centroids).all()):
        raise KMeansFileError(f"{path}: 'centroids' holds NaN or infinite values")
    return KMeans(
        centroids=centroids.contiguous(),
        inertia=float(inertia),
        iterations=content["iterations"],
        layer=layer,
        seed=content["seed"],
        frames=content["frames"],
        model=content["model"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Feature files (written by spidr.extract)


def _feature_files(features: Path) -> list[Path]:
    if features.is_file():
        return [features]
    if not features.is_dir():
        raise FeatureFileError(f"{features}: no such file or directory")
    files = sorted(p for p in features.rglob("*.pt") if p.is_file())
    if not files:
        raise FeatureFileError(f"{features}: no .pt feature files found (searched recursively)")
    return files


def _read_layer(path: Path, layer: int) -> tuple[Tensor, str | None]:
    """The (T, D) features of ``layer`` in one spidr.extract file, and the model name it records."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and unpickler errors have no common base class
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FeatureFileError(f"{path}: cannot be read as a feature file ({first})") from error
    if not isinstance(content, dict) or content.get("format") != FEATURES_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise FeatureFileError(f"{path}: not a {FEATURES_FORMAT} feature file (format {found!r})")
    features = content.get("features")
    if features is None and "units" in content:
        raise FeatureFileError(f"{path}: holds units, not features (written with --units); k-means needs features")
    if not isinstance(features, dict):
        raise FeatureFileError(f"{path}: 'features' must be a dict of layer -> tensor")
    if layer not in features:
        have = ", ".join(str(key) for key in sorted(features, key=str)) or "none"
        raise FeatureFileError(f"{path}: no layer {layer} in this file (it has layers {have})")
    tensor = features[layer]
    if not isinstance(tensor, Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        what = f"shape {tuple(tensor.shape)}, {tensor.dtype}" if isinstance(tensor, Tensor) else type(tensor).__name__
        raise FeatureFileError(f"{path}: layer {layer} must be a 2-D float tensor (T, D), got {what}")
    model = content.get("model")
    return tensor, model if isinstance(model, str) else None


class _Reservoir:
    """A uniform random sample without replacement of ``capacity`` rows from a stream (Algorithm R).

    Row t of the stream (0-based) is kept with probability capacity / (t + 1), replacing a uniformly
    chosen slot; at any time the slots hold a uniform sample of the rows seen. Vectorised per chunk:
    when two rows of a chunk draw the same slot, the later one wins, as in the row-by-row algorithm.
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = capacity
        self.generator = generator
        self.seen = 0
        self._filling: list[Tensor] = []
        self._filled = 0
        self._slots: Tensor | None = None

    def add(self, rows: Tensor) -> None:
        if self._slots is None:
            room = self.capacity - self._filled
            self._filling.append(rows[:room])
            self._filled += min(room, rows.shape[0])
            self.seen += min(room, rows.shape[0])
            rows = rows[room:]
            if self._filled < self.capacity:
                return
            self._slots = torch.cat([chunk.float() for chunk in self._filling])
            self._filling = []
        if rows.shape[0] == 0:
            return
        count = rows.shape[0]
        positions = torch.arange(self.seen + 1, self.seen + count + 1, dtype=torch.float64)
        draws = (torch.rand(count, dtype=torch.float64, generator=self.generator) * positions).long()
        self.seen += count
        keep = (draws < self.capacity).nonzero().flatten()
        if keep.numel() == 0:
            return
        slots = draws[keep]
        order = torch.sort(slots, stable=True).indices
        slots, keep = slots[order], keep[order]
        last = torch.ones_like(slots, dtype=torch.bool)
        last[:-1] = slots[1:] != slots[:-1]  # the last (latest row) of each run of equal slots
        self._slots[slots[last]] = rows[keep[last]].float()

    def result(self) -> Tensor:
        if self._slots is not None:
            return self._slots
        if not self._filling:
            return torch.empty(0, 0)
        return torch.cat([chunk.float() for chunk in self._filling])


def _concatenate(chunks: list[Tensor]) -> Tensor:
    """Concatenate into float32, releasing each chunk as it is copied (peak: chunks + result)."""
    total = sum(chunk.shape[0] for chunk in chunks)
    out = torch.empty((total, chunks[0].shape[1]), dtype=torch.float32)
    start = 0
    while chunks:
        chunk = chunks.pop(0)
        out[start : start + chunk.shape[0]] = chunk
        start += chunk.shape[0]
    return out


def _iterate(items: Sequence[Path], progress: bool) -> Iterator[tuple[Path, Any]]:
    bar = _progress_bar(len(items), progress, "reading", "file")
    try:
        for item in items:
            yield item, bar
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def load_layer_features(
    features: str | os.PathLike[str],
    layer: int,
    *,
    max_frames: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, str | None, int]:
    """Read one layer's frames from ``spidr.extract`` feature files.

    Args:
        features: a directory (searched recursively for ``*.pt``; other files such as ``index.jsonl``
            are ignored) or one feature file. Each file is a ``torch.save`` dict
            ``{"format": "spidr.extract/1", "model": str, "features": {layer: (T, D) tensor}, ...}``.
        layer: the 1-based layer number, a key of ``features``.
        max_frames: keep a uniform random sample of at most this many frames among all the files'
            frames (without replacement; reservoir sampling, Algorithm R, seeded by ``seed``). Files are
            read one at a time, so memory stays at about ``max_frames x D`` float32 (plus one file) however
            large the total. None keeps every frame, in file order (sorted paths).
        seed: seeds the sampling.
        progress: a tqdm bar over the files (when tqdm is installed).

    Returns:
        (frames (F, D) float32 on the CPU, the model name when all files record the same one else None,
        the total number of frames read).

    Raises:
        FeatureFileError: (a ValueError) naming the file: missing path, no ``.pt`` file, unreadable or not a
            feature file, no such layer (listing the layers it has), a feature dimension that differs
            between files, or no frame at all.
        ValueError: max_frames < 1.
    """
    root = Path(features)
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got max_frames={max_frames!r}")
    files = _feature_files(root)
    generator = torch.Generator().manual_seed(seed)
    reservoir = _Reservoir(max_frames, generator) if max_frames is not None else None
    chunks: list[Tensor] = []
    models: set[str | None] = set()
    dim: tuple[Path, int] | None = None
    total = 0
    for path, bar in _iterate(files, progress):
        tensor, model = _read_layer(path, layer)
        models.add(model)
        if dim is None:
            dim = (path, tensor.shape[1])
        elif tensor.shape[1] != dim[1]:
            raise FeatureFileError(
                f"{path}: layer {layer} has {tensor.shape[1]} features per frame but {dim[0]} has {dim[1]}"
            )
        total += tensor.shape[0]
        if reservoir is not None:
            reservoir.add(tensor)
        elif tensor.shape[0]:
            chunks.append(tensor)
        if bar is not None:
            bar.set_postfix(frames=total)
    if total == 0:
        raise FeatureFileError(f"{root}: layer {layer} holds no frame in the {len(files)} file(s)")
    frames = reservoir.result() if reservoir is not None else _concatenate(chunks)
    model = next(iter(models)) if len(models) == 1 else None
    return frames, model, total


# ----------------------------------------------------------------------------------------------------------------
# Command line

_DESCRIPTION = """\
Fit k-means to one layer's frame features and save the centroids (format spidr.kmeans/1).

FEATURES is a directory of feature files written by `python -m spidr.extract` (searched recursively for
*.pt; index.jsonl and errors.jsonl are ignored) or one such file. The centroids are seeded by k-means++ and
refined by Lloyd iterations over all frames, or by mini-batch k-means (Sculley 2010) with --batch-size.
Empty clusters are re-seeded on the frames farthest from their centroid. Iterations stop after --iters or
when the inertia (sum of squared distances to the assigned centroid) changes by less than --tol (relative).
The result loads with spidr.kmeans.load_kmeans(path); its .predict(frames) gives the units.
"""

_EPILOG = """\
examples:
  python -m spidr.kmeans features/ kmeans_l6_k256.pt --k 256 --layer 6
  python -m spidr.kmeans features/ km.pt --k 500 --layer 8 --max-frames 1000000 --device cuda
  python -m spidr.kmeans features/ km.pt --k 256 --layer 6 --batch-size 10000 --iters 20
  python -m spidr.kmeans features/alice/utt00.pt km.pt --k 16 --layer 6

exit status: 0 on success, 1 on an error (one line on stderr; --debug shows the traceback), 2 on a
command-line syntax error.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spidr.kmeans",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("features", metavar="FEATURES", type=Path, help="directory of feature files, or one file")
    parser.add_argument("output", metavar="OUTPUT.pt", type=Path, help="k-means file to write (atomically)")
    parser.add_argument("--k", type=int, required=True, help="number of centroids (units), e.g. 256")
    parser.add_argument("--layer", type=int, required=True, help="1-based layer number in the feature files")
    parser.add_argument(
        "--iters", type=int, default=100, help="most iterations (passes with --batch-size); default 100"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of k-means++, of --max-frames and of the mini-batch shuffles; default 0",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=None,
        metavar="M",
        help="fit a uniform random sample of M frames (without replacement, across all files, reservoir "
        "sampling: memory stays about M x D floats); default: every frame",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="mini-batch k-means with B frames per batch (one iteration = one pass); default: full batch",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="stop when the inertia changes by less than this "
        "fraction between iterations (0: only at a fixed point); default 1e-4",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where to compute; default: cuda if available, else cpu",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m spidr.kmeans``; returns the exit status (0, or 1 after a one-line error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        format="kmeans: %(levelname)s: %(message)s", level=logging.DEBUG if args.debug else logging.WARNING
    )
    try:
        return _run(args)
    except (FeatureFileError, KMeansFileError, ValueError, TypeError, OSError, RuntimeError) as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"kmeans: error: {message}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available (no GPU, or a CPU-only build of torch)")
    if not args.output.parent.is_dir():
        raise ValueError(f"{args.output}: the directory {args.output.parent} does not exist")
    if args.k < 1:
        raise ValueError(f"--k must be at least 1, got {args.k}")
    _check_options(args.iters, args.seed, args.batch_size, args.tol)
    progress = not args.quiet and sys.stderr.isatty()
    frames, model_name, total = load_layer_features(
        args.features, args.layer, max_frames=args.max_frames, seed=args.seed, progress=progress
    )
    frames = frames.to(device)
    fitted = _fit(
        frames,
        args.k,
        iters=args.iters,
        seed=args.seed,
        batch_size=args.batch_size,
        tol=args.tol,
        init=None,
        progress=progress,
        owned=True,
    )
    fitted = replace(fitted, layer=args.layer, model=model_name)
    save_kmeans(fitted, args.output)
    read = f" (sampled from {total})" if fitted.frames != total else ""
    print(
        f"kmeans: {fitted.frames} frames{read}, k={fitted.k}, {fitted.iterations} iterations, "
        f"inertia {fitted.inertia:.6g}, {time.perf_counter() - start:.1f} s -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
