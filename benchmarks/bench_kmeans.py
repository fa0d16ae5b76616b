"""K-means: one Lloyd iteration of ``spidr.kmeans`` against scikit-learn's, same data and initial centroids.

    python benchmarks/bench_kmeans.py              # N=100_000 frames, D=768, K=256
    python benchmarks/bench_kmeans.py --quick      # N=5000, D=64, K=32 (a smoke run)

Data: a seeded mixture of 2K Gaussian clusters in float32 (unit noise around centres of scale 2), mean
subtracted once outside the timings (both implementations fit centred data; sklearn's ``fit`` centres
too); the initial centroids are K frames drawn with a seeded permutation. Rows:

- ``sklearn`` (reference): one iteration of scikit-learn's Lloyd loop, the function ``fit`` calls once
  per iteration (``sklearn.cluster._k_means_lloyd.lloyd_iter_chunked_dense``: chunked assignment and
  centre update in one OpenMP pass, its threads = sklearn's effective OpenMP threads, BLAS limited to
  one thread as ``fit`` does). It computes no inertia (``fit`` does so once at the end);
- ``spidr``: one full-batch iteration of ``spidr.kmeans`` (the fit loop's two halves): assignment with
  ``spidr.ops.assign_codes``, segment sums, the inertia from the segment sums, the new centroids;
- ``sklearn fit(max_iter=1)`` and ``spidr fit_kmeans(iters=1)``: the public calls with one iteration,
  which add input checks, the centring copy and a final assignment pass for the final inertia.

The ``inertia@I`` column is the final inertia of each library after I iterations from the same initial
centroids (``tol=0``), computed once outside the timings; ``gap`` is ours relative to scikit-learn's.
With ``--device cuda`` the spidr rows run on the GPU (scikit-learn has no GPU path).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Row, Suite, machine_line, measure
from spidr import kmeans

INERTIA_ITERS = 10


def _data(n: int, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2 * k, d, generator=g) * 2.0
    x = centres[torch.randint(2 * k, (n,), generator=g)] + torch.randn(n, d, generator=g)
    x -= x.mean(0)
    init = x[torch.randperm(n, generator=g)[:k]].clone()
    return x, init


def _sklearn_rows(x: torch.Tensor, init: torch.Tensor, repeats: int, notes: list[str]) -> list[Row]:
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    features, centres = x.numpy(), init.numpy()
    k = centres.shape[0]
    rows = []
    try:
        from sklearn.cluster._k_means_lloyd import lloyd_iter_chunked_dense
        from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
    except ImportError:
        notes.append("sklearn's private lloyd_iter_chunked_dense is not importable here: no per-iteration row.")
    else:
        weights = np.ones(features.shape[0], dtype=features.dtype)
        new_centres = np.empty_like(centres)
        in_clusters = np.empty(k, dtype=features.dtype)
        labels = np.empty(features.shape[0], dtype=np.int32)
        shift = np.empty(k, dtype=features.dtype)
        threads = _openmp_effective_n_threads()

        def one_iteration() -> None:
            lloyd_iter_chunked_dense(features, weights, centres, new_centres, in_clusters, labels, shift, threads)

        with threadpool_limits(limits=1, user_api="blas"):
            rows.append(measure("sklearn", one_iteration, repeats=repeats, note=f"{threads} OpenMP threads"))

    def fit(iters: int) -> KMeans:
        model = KMeans(n_clusters=k, init=centres, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
        with warnings.catch_warnings():
            # After one iteration from random frames a few clusters can be empty; sklearn warns about it.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(features)

    rows.append(measure("sklearn fit(max_iter=1)", lambda: fit(1), repeats=repeats))
    inertia = float(fit(INERTIA_ITERS).inertia_)
    for row in rows:
        row.extra[f"inertia@{INERTIA_ITERS}"] = inertia
    return rows


def _spidr_rows(x: torch.Tensor, init: torch.Tensor, repeats: int, device: str) -> list[Row]:
    x, init = x.to(device), init.to(device)
    k = init.shape[0]
    data = kmeans._prepare(x)  # the fit's centred float32 working copy (x is already centred)
    centroids = (init.double() - data.mean).float()

    def one_iteration() -> None:
        step = kmeans._lloyd_assign(data, centroids)
        kmeans._lloyd_update(data, centroids, step)

    first = measure("spidr", one_iteration, repeats=repeats, device=device)
    first.note = f"ops backend: {_backend(device)}"  # read after the run: the backend that ran
    rows = [
        first,
        measure(
            "spidr fit_kmeans(iters=1)",
            lambda: kmeans.fit_kmeans(x, k, init=init, iters=1, tol=0.0),
            repeats=repeats,
            device=device,
        ),
    ]
    inertia = kmeans.fit_kmeans(x, k, init=init, iters=INERTIA_ITERS, tol=0.0).inertia
    for row in rows:
        row.extra[f"inertia@{INERTIA_ITERS}"] = inertia
    return rows


def _backend(device: str) -> str:
    from spidr import ops

    return ops.last_backend() or ops.backends(device)[0]


def run_suite(*, repeats: int = 5, quick: bool = False, device: str = "cpu") -> Suite:
    """Time one Lloyd iteration of scikit-learn and of spidr.kmeans; see the module docstring."""
    n, d, k = (5000, 64, 32) if quick else (100_000, 768, 256)
    x, init = _data(n, d, k)
    notes: list[str] = []
    skipped: list[str] = []
    rows: list[Row] = []
    try:
        rows += _sklearn_rows(x, init, repeats, notes)
    except ImportError as error:
        skipped.append(f"sklearn rows: scikit-learn is not installed ({error})")
    rows += _spidr_rows(x, init, repeats, device)
    key = f"inertia@{INERTIA_ITERS}"
    reference = next((r.extra[key] for r in rows if r.name.startswith("sklearn")), None)
    if isinstance(reference, float) and reference > 0:
        for row in rows:
            row.extra["gap"] = f"{(float(row.extra[key]) - reference) / reference:+.1e}"
    notes.append(
        f"Shapes: N={n} frames, D={d}, K={k}, float32, {device}. Median of {repeats} runs after a warm-up. "
        f"`sklearn` times sklearn's per-iteration Lloyd function (assignment + centre update, no inertia); "
        f"`spidr` times our fit loop's iteration (assignment + segment sums + inertia + update). "
        f"inertia@{INERTIA_ITERS}: final inertia after {INERTIA_ITERS} iterations from the same initial centroids."
    )
    suite = Suite(
        name="kmeans",
        title=f"k-means: one Lloyd iteration, N={n} D={d} K={k}",
        rows=rows,
        reference="sklearn" if any(r.name == "sklearn" for r in rows) else None,
        notes=notes,
        skipped=skipped,
    )
    return suite.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (N=5000, D=64, K=32): a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up (default 5)")
    parser.add_argument("--device", default="cpu", help="device of the spidr rows (cpu or cuda; default cpu)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the table as JSON to OUT")
    args = parser.parse_args(argv)
    suite = run_suite(repeats=args.repeats, quick=args.quick, device=args.device)
    print(machine_line())
    print()
    print(suite.markdown())
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "suites": [suite.to_dict()]}, indent=2))


if __name__ == "__main__":
    main()
