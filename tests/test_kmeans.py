"""spidr.kmeans: fitting against scikit-learn, k-means++, mini-batch, predict, the file format and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spidr.kmeans import (
    FORMAT,
    FeatureFileError,
    KMeans,
    KMeansFileError,
    _Reservoir,
    fit_kmeans,
    kmeans_plusplus,
    load_kmeans,
    load_layer_features,
    main,
    save_kmeans,
)


def blobs(centres: torch.Tensor, per_blob: int, std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames drawn around each centre (interleaved), and the index of the blob of each frame."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(centres.shape[0]).repeat(per_blob)
    return centres[truth] + std * torch.randn(truth.shape[0], centres.shape[1], generator=g), truth


def separated_centres(k: int, d: int, seed: int, scale: float = 10.0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) * scale


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether labels and truth split the frames the same way (up to a renaming of the clusters)."""
    pairs = torch.unique(torch.stack([labels, truth]), dim=1)
    return pairs.shape[1] == len(torch.unique(labels)) == len(torch.unique(truth))


def brute_force_inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((torch.cdist(x.double(), centroids.double()) ** 2).min(1).values.sum())


# ----------------------------------------------------------------------------------------------------------------
# Fitting


@pytest.mark.parametrize(("n", "d", "k", "iters"), [(2000, 8, 10, 30), (1500, 32, 24, 5)])
def test_same_init_matches_sklearn_lloyd(n, d, k, iters):
    cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(n + k)
    # Overlapping clusters, so that the iterations move many labels.
    x, _ = blobs(torch.randn(k // 2, d, generator=g) * 2, n // (k // 2), 1.0, seed=k)
    init = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    ours = fit_kmeans(x, k, init=init, iters=iters, tol=0.0)
    reference = cluster.KMeans(n_clusters=k, init=init.numpy(), n_init=1, algorithm="lloyd", max_iter=iters, tol=0.0)
    reference.fit(x.numpy())
    assert ours.iterations <= iters
    assert abs(ours.inertia - reference.inertia_) <= 0.01 * reference.inertia_
    # The reported inertia is the exact one of the returned centroids.
    assert ours.inertia == pytest.approx(brute_force_inertia(x, ours.centroids), rel=1e-5)


def test_kmeans_plusplus_is_reproducible():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    first = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(7))
    again = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(7))
    other = kmeans_plusplus(x, 12, generator=torch.Generator().manual_seed(8))
    assert first.shape == (12, 6) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every centroid is a frame, and no frame is chosen twice.
    matches = torch.cdist(first, x).argmin(1)
    assert torch.equal(x[matches], first) and len(torch.unique(matches)) == 12
    # bfloat16 frames are seeded in float32.
    assert kmeans_plusplus(x.bfloat16(), 3, generator=torch.Generator().manual_seed(0)).dtype == torch.float32


def test_kmeans_plusplus_draws_proportionally_to_squared_distance():
    # Frames 0, 1, 3 on a line, k = 2: given the first centroid, the second is drawn with probability
    # proportional to its squared distance to the first: e.g. first 0 -> 1 with 1/10, 3 with 9/10.
    x = torch.tensor([[0.0], [1.0], [3.0]])
    expected = {0.0: {1.0: 0.1, 3.0: 0.9}, 1.0: {0.0: 0.2, 3.0: 0.8}, 3.0: {0.0: 9 / 13, 1.0: 4 / 13}}
    counts: dict[float, dict[float, int]] = {first: dict.fromkeys(expected[first], 0) for first in expected}
    for seed in range(1200):
        first, second = kmeans_plusplus(x, 2, generator=torch.Generator().manual_seed(seed)).flatten().tolist()
        counts[first][second] += 1  # a KeyError would mean a frame drawn twice
    for first, seconds in counts.items():
        total = sum(seconds.values())
        assert total > 300  # the first centroid is uniform: about 400 each
        for second, hits in seconds.items():
            assert abs(hits / total - expected[first][second]) < 0.08


def test_kmeans_plusplus_covers_blobs_and_beats_random_init():
    centres = separated_centres(8, 4, seed=3)
    x, truth = blobs(centres, 150, 0.2, seed=4)
    model = with_centroids(centres)
    plusplus, uniform = [], []
    for seed in range(5):
        seeded = kmeans_plusplus(x, 8, generator=torch.Generator().manual_seed(seed))
        # one initial centroid in each blob
        assert sorted(model.predict(seeded).tolist()) == list(range(8))
        plusplus.append(with_centroids(seeded).inertia_of(x))
        picks = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:8]
        uniform.append(with_centroids(x[picks]).inertia_of(x))
    assert sum(plusplus) < 0.5 * sum(uniform)
    # Fitted from k-means++, the clusters are the blobs and the centroids their centres.
    fitted = fit_kmeans(x, 8, seed=0)
    assert same_partition(fitted.predict(x), truth)
    assert torch.cdist(fitted.centroids, centres).min(1).values.max() < 0.1
    assert fitted.iterations < 100  # stopped at a fixed point, not by the iteration limit
    assert fitted.inertia == pytest.approx(brute_force_inertia(x, centres), rel=0.05)


def with_centroids(centroids: torch.Tensor) -> KMeans:
    return KMeans(centroids=centroids, inertia=0.0, iterations=0, layer=None, seed=0, frames=0)


def test_mini_batch_close_to_full_batch():
    x, _ = blobs(separated_centres(10, 6, seed=5, scale=3.0), 300, 1.0, seed=6)
    init = kmeans_plusplus(x, 10, generator=torch.Generator().manual_seed(0))
    full = fit_kmeans(x, 10, init=init)
    mini = fit_kmeans(x, 10, init=init, batch_size=128, iters=30, seed=1)
    assert mini.inertia <= 1.02 * full.inertia
    assert mini.inertia == pytest.approx(brute_force_inertia(x, mini.centroids), rel=1e-5)
    again = fit_kmeans(x, 10, init=init, batch_size=128, iters=30, seed=1)
    assert torch.equal(mini.centroids, again.centroids) and mini.iterations == again.iterations


def test_empty_cluster_is_reseeded_on_the_farthest_frame():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x, truth = blobs(centres, 100, 0.3, seed=2)
    # The third initial centroid is far from every frame: it gets none at the first assignment.
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [1000.0, 1000.0]])
    fitted = fit_kmeans(x, 3, init=init)
    assert same_partition(fitted.predict(x), truth)
    assert torch.equal(fitted.centroids, fit_kmeans(x, 3, init=init).centroids)
    # Mini-batch mode re-seeds the centroid that stayed empty for a whole pass.
    mini = fit_kmeans(x, 3, init=init, batch_size=64, iters=20)
    assert len(torch.unique(mini.predict(x))) == 3


def test_stops_on_iteration_limit_and_tolerance():
    x, _ = blobs(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), 100, 1.0, seed=1)
    init = x[:12].clone()
    assert fit_kmeans(x, 12, init=init, iters=2, tol=0.0).iterations == 2
    unlimited = fit_kmeans(x, 12, init=init, iters=500, tol=0.0)
    loose = fit_kmeans(x, 12, init=init, iters=500, tol=0.05)
    assert loose.iterations < unlimited.iterations < 500
    zero = fit_kmeans(x, 12, init=init, iters=0)
    assert zero.iterations == 0 and torch.allclose(zero.centroids, init, atol=1e-5)
    assert zero.inertia == pytest.approx(brute_force_inertia(x, init), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# predict


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_predict_matches_brute_force_argmin(dtype):
    g = torch.Generator().manual_seed(11)
    centroids = torch.randn(20, 16, generator=g)
    x = torch.randn(600, 16, generator=g).to(dtype)
    distances = torch.cdist(x.float().double(), centroids.double())
    best = distances.topk(2, largest=False).values
    clear = (best[:, 1] - best[:, 0]) > 1e-3  # no near-ties
    assert clear.sum() > 550
    model = KMeans(centroids=centroids, inertia=0.0, iterations=0, layer=None, seed=0, frames=0)
    labels = model.predict(x)
    assert labels.dtype == torch.int64 and labels.shape == (600,)
    assert torch.equal(labels[clear], distances.argmin(1)[clear])
    assert model.inertia_of(x) == pytest.approx(float((best[:, 0] ** 2).sum()), rel=1e-5)


def test_predict_rejects_wrong_shapes():
    model = KMeans(centroids=torch.zeros(3, 4), inertia=0.0, iterations=0, layer=None, seed=0, frames=0)
    with pytest.raises(ValueError, match="x has 5 features per frame but the centroids have 4"):
        model.predict(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="x must be 2-D"):
        model.predict(torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        model.predict(torch.zeros(2, 4, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------------------
# File format


def small_model() -> KMeans:
    centroids = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    return KMeans(centroids=centroids, inertia=12.5, iterations=7, layer=6, seed=3, frames=40, model="spidr_base")


def test_save_load_round_trip(tmp_path):
    model = small_model()
    path = tmp_path / "km.pt"
    save_kmeans(model, path)
    loaded = load_kmeans(path)
    assert torch.equal(loaded.centroids, model.centroids) and loaded.centroids.dtype == torch.float32
    assert (loaded.inertia, loaded.iterations, loaded.layer, loaded.seed, loaded.frames, loaded.model) == (
        12.5,
        7,
        6,
        3,
        40,
        "spidr_base",
    )
    assert loaded.k == 5
    assert [p.name for p in tmp_path.iterdir()] == ["km.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["k"] == 5
    # Overwriting replaces the file; layer and model may be None.
    save_kmeans(KMeans(model.centroids, 1.0, 1, None, 0, 5), path)
    assert load_kmeans(path).layer is None and load_kmeans(path).model is None


def test_save_into_missing_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_kmeans(small_model(), tmp_path / "missing" / "km.pt")


def _content() -> dict:
    model = small_model()
    return {
        "format": FORMAT,
        "centroids": model.centroids,
        "layer": 6,
        "k": 5,
        "inertia": 1.0,
        "iterations": 2,
        "seed": 0,
        "frames": 40,
        "model": None,
    }


def _without(key: str) -> dict:
    content = _content()
    del content[key]
    return content


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "not a k-means file .*found 'list'"),
        ({**_content(), "format": "spidr.extract/1"}, "not a k-means file .*'spidr.extract/1'"),
        (_without("centroids"), "missing key\\(s\\) centroids"),
        (_without("frames"), "missing key\\(s\\) frames"),
        ({**_content(), "centroids": torch.zeros(5)}, "'centroids' must be a 2-D float32 tensor .*shape \\(5,\\)"),
        ({**_content(), "centroids": torch.zeros(5, 3, dtype=torch.float64)}, "float32 .*got a float64"),
        ({**_content(), "centroids": [[0.0]]}, "'centroids' must be a 2-D float32 tensor .*got a list"),
        ({**_content(), "k": 4}, "'k' is 4 but 'centroids' has 5 rows"),
        ({**_content(), "iterations": 2.5}, "'iterations' must be an int"),
        ({**_content(), "layer": "6"}, "'layer' must be an int or None"),
        ({**_content(), "model": 3}, "'model' must be a str or None"),
        ({**_content(), "centroids": torch.full((5, 3), float("nan"))}, "NaN"),
    ],
)
def test_load_rejects_bad_content(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(KMeansFileError, match=message) as info:
        load_kmeans(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(KMeansFileError, match="no such k-means file") as info:
        load_kmeans(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(KMeansFileError, match="garbage.pt: not a k-means file \\(torch.load failed"):
        load_kmeans(garbage)


# ----------------------------------------------------------------------------------------------------------------
# Feature files and the command line


def write_features(path: Path, layers: dict[int, torch.Tensor], model: str = "spidr_base") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = next(iter(layers.values())).shape[0]
    content = {
        "format": "spidr.extract/1",
        "source": f"{path.parent.name}/{path.stem}.wav",
        "model": model,
        "frame_rate": 50,
        "layers": sorted(layers),
        "frames": frames,
        "features": layers,
    }
    torch.save(content, path)


@pytest.fixture
def feature_dir(tmp_path) -> tuple[Path, torch.Tensor]:
    """Three feature files (layers 6 and 8, one in bfloat16) holding four blobs; returns (dir, layer-6 frames)."""
    root = tmp_path / "features"
    x, _ = blobs(separated_centres(4, 8, seed=9), 30, 0.2, seed=10)
    parts = [x[:50], x[50:90], x[90:]]
    for i, (speaker, part) in enumerate(zip(["alice", "bob", "bob"], parts, strict=True)):
        layer6 = part.bfloat16() if i == 1 else part
        write_features(root / speaker / f"utt{i:02d}.pt", {6: layer6, 8: -part})
    (root / "index.jsonl").write_text('{"source": "alice/utt00.wav"}\n')
    (root / "errors.jsonl").write_text("")
    ordered = torch.cat([parts[0], parts[1].bfloat16().float(), parts[2]])
    return root, ordered


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "spidr.kmeans", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_with_max_frames(feature_dir, tmp_path):
    root, _ = feature_dir
    out = tmp_path / "km.pt"
    done = run_cli(str(root), str(out), "--k", "4", "--layer", "6", "--max-frames", "60", "--seed", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "60 frames (sampled from 120)" in summary and "k=4" in summary and str(out) in summary
    model = load_kmeans(out)
    assert (model.k, model.layer, model.frames, model.seed, model.model) == (4, 6, 60, 1, "spidr_base")
    assert model.dim == 8


def test_cli_missing_layer_exits_1_with_one_line(feature_dir, tmp_path):
    root, _ = feature_dir
    done = run_cli(str(root), str(tmp_path / "km.pt"), "--k", "4", "--layer", "7", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "utt00.pt: no layer 7 in this file (it has layers 6, 8)" in done.stderr
    assert not (tmp_path / "km.pt").exists()


def test_cli_in_process_every_frame_and_single_file(feature_dir, tmp_path, capsys):
    root, x = feature_dir
    out = tmp_path / "all.pt"
    assert main([str(root), str(out), "--k", "4", "--layer", "6", "--iters", "20", "--quiet", "--device", "cpu"]) == 0
    model = load_kmeans(out)
    assert model.frames == 120 and model.iterations <= 20
    assert model.inertia == pytest.approx(brute_force_inertia(x, model.centroids), rel=1e-4)
    single = root / "alice" / "utt00.pt"
    assert main([str(single), str(out), "--k", "3", "--layer", "8", "--batch-size", "16", "--quiet"]) == 0
    assert (load_kmeans(out).frames, load_kmeans(out).layer) == (50, 8)
    assert "50 frames, k=3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "500"], "k=500 is more than the number of frames \\(120\\)"),
        (["--k", "0"], "--k must be at least 1, got 0"),
        (["--k", "4", "--max-frames", "0"], "max_frames must be None or an int >= 1"),
        (["--k", "4", "--batch-size", "0"], "batch_size must be None or an int >= 1"),
        (["--k", "4", "--tol", "-1"], "tol must be a number >= 0"),
    ],
)
def test_cli_bad_values_exit_1(feature_dir, tmp_path, capsys, extra, message):
    root, _ = feature_dir
    assert main([str(root), str(tmp_path / "km.pt"), "--layer", "6", "--quiet", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kmeans: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_bad_paths_exit_1(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "km.pt"), "--k", "2", "--layer", "6"]) == 1
    assert "nowhere: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "km.pt"), "--k", "2", "--layer", "6"]) == 1
    assert "no .pt feature files found" in capsys.readouterr().err
    assert main([str(tmp_path / "empty"), str(tmp_path / "no" / "km.pt"), "--k", "2", "--layer", "6"]) == 1
    assert "the directory" in capsys.readouterr().err


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--k", "--layer", "--iters", "--seed", "--max-frames", "--batch-size", "--tol", "--device"):
        assert option in text
    assert "python -m spidr.kmeans features/" in text


def test_load_layer_features_errors(tmp_path):
    write_features(tmp_path / "a.pt", {6: torch.zeros(3, 4)})
    write_features(tmp_path / "b.pt", {6: torch.zeros(3, 5)})
    with pytest.raises(FeatureFileError, match="b.pt: layer 6 has 5 features per frame but .*a.pt has 4"):
        load_layer_features(tmp_path, 6)
    torch.save({"format": "other"}, tmp_path / "c.pt")
    with pytest.raises(FeatureFileError, match="c.pt: not a spidr.extract/1 feature file"):
        load_layer_features(tmp_path / "c.pt", 6)
    write_features(tmp_path / "d.pt", {6: torch.zeros(3)})
    with pytest.raises(FeatureFileError, match="d.pt: layer 6 must be a 2-D float tensor"):
        load_layer_features(tmp_path / "d.pt", 6)
    torch.save(
        {"format": "spidr.extract/1", "layers": [6], "units": {6: torch.zeros(3, dtype=torch.int16)}},
        tmp_path / "u.pt",
    )
    with pytest.raises(FeatureFileError, match="u.pt: holds units, not features"):
        load_layer_features(tmp_path / "u.pt", 6)
    write_features(tmp_path / "e.pt", {6: torch.zeros(0, 4)})
    with pytest.raises(FeatureFileError, match="holds no frame"):
        load_layer_features(tmp_path / "e.pt", 6)


def test_max_frames_is_a_seeded_uniform_sample(feature_dir):
    root, x = feature_dir
    sample, model, total = load_layer_features(root, 6, max_frames=30, seed=4)
    assert (sample.shape, sample.dtype, model, total) == ((30, 8), torch.float32, "spidr_base", 120)
    rows = torch.cdist(sample, x).argmin(1)
    assert torch.equal(x[rows], sample) and len(torch.unique(rows)) == 30  # distinct frames of the data
    assert torch.equal(load_layer_features(root, 6, max_frames=30, seed=4)[0], sample)
    everything, _, _ = load_layer_features(root, 6, max_frames=1000)
    assert torch.equal(everything, x)
    # Each of 20 frames streamed in chunks of 7, 5 and 8 is kept with probability 5 / 20.
    hits = torch.zeros(20)
    trials = 800
    stream = torch.arange(20, dtype=torch.float32).unsqueeze(1)
    for seed in range(trials):
        reservoir = _Reservoir(5, torch.Generator().manual_seed(seed))
        for chunk in (stream[:7], stream[7:12], stream[12:]):
            reservoir.add(chunk)
        kept = reservoir.result().flatten().long()
        assert len(torch.unique(kept)) == 5
        hits[kept] += 1
    expected = trials * 5 / 20  # 200, standard deviation about 12
    assert (hits - expected).abs().max() < 60


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "message"),
    [
        (torch.zeros(10, 2), {"k": 0}, ValueError, "k must be at least 1, got k=0"),
        (torch.zeros(10, 2), {"k": 11}, ValueError, "k=11 is more than the number of frames \\(10\\)"),
        (torch.zeros(10), {"k": 2}, ValueError, "x must be 2-D .*shape \\(10,\\)"),
        (torch.zeros(2, 10, 2), {"k": 2}, ValueError, "x must be 2-D"),
        (torch.zeros(10, 2, dtype=torch.int32), {"k": 2}, TypeError, "x must be a floating-point tensor"),
        (torch.tensor([[0.0], [float("nan")], [1.0]]), {"k": 2}, ValueError, "x contains NaN .*row 1"),
        (torch.tensor([[0.0], [1.0], [float("inf")]]), {"k": 2}, ValueError, "x contains NaN or infinite .*row 2"),
        (torch.zeros(10, 2), {"k": 2, "iters": -1}, ValueError, "iters must be an int >= 0, got iters=-1"),
        (torch.zeros(10, 2), {"k": 2, "tol": -0.1}, ValueError, "tol must be a number >= 0, got tol=-0.1"),
        (torch.zeros(10, 2), {"k": 2, "batch_size": 0}, ValueError, "batch_size must be None or an int >= 1"),
        (torch.zeros(10, 2), {"k": 2, "init": torch.zeros(3, 2)}, ValueError, "init must have shape \\(k=2, D=2\\)"),
        (
            torch.zeros(10, 2),
            {"k": 2, "init": torch.zeros(2, 3)},
            ValueError,
            "init has 3 features per frame but x has 2",
        ),
        (torch.zeros(10, 2), {"k": 2.0}, ValueError, "k must be an int, got 2.0"),
    ],
)
def test_fit_rejects_bad_arguments(x, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_kmeans(x, **kwargs)


def test_kmeans_plusplus_rejects_bad_arguments():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="k=4 is more than the number of frames \\(3\\)"):
        kmeans_plusplus(torch.zeros(3, 2), 4, generator=generator)
    with pytest.raises(ValueError, match="x contains NaN"):
        kmeans_plusplus(torch.tensor([[float("nan")], [0.0]]), 1, generator=generator)


def test_duplicate_frames_fewer_distinct_than_k():
    # Two distinct frames, k = 3: seeding falls back to uniform draws, fitting still ends.
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    fitted = fit_kmeans(x, 3, seed=0)
    assert fitted.inertia == pytest.approx(0.0, abs=1e-9)
    assert set(map(tuple, fitted.centroids.tolist())) == {(0.0, 0.0), (1.0, 1.0)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_cpu():
    x, _ = blobs(separated_centres(6, 16, seed=0), 200, 0.5, seed=1)
    init = kmeans_plusplus(x, 6, generator=torch.Generator().manual_seed(0))
    cpu = fit_kmeans(x, 6, init=init)
    gpu = fit_kmeans(x.cuda(), 6, init=init)
    assert torch.allclose(cpu.centroids, gpu.centroids, atol=1e-4)
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-5)
    assert torch.equal(cpu.predict(x), gpu.predict(x.cuda()).cpu())


def test_same_partition_helper():
    # same_partition is what the blob tests rely on: it must tell a renaming from a different split.
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert same_partition(torch.tensor([2, 2, 0, 0, 1, 1]), truth)
    assert not same_partition(torch.tensor([0, 0, 0, 1, 2, 2]), truth)
