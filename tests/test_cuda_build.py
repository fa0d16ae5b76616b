"""CUDA kernels (csrc/cuda/*.cu): they compile with nvcc for sm_80 and sm_90, and on a GPU they match
``spidr.ops.reference``.

The compile tests need only nvcc (skipped without it) and run on machines without a GPU or a CUDA build
of torch: each source is compiled on its own to an object file, as setup.py's CUDA build would, one
arch per nvcc call (about 25 s each on 2 cores). The parity tests are marked ``gpu`` and run only
where CUDA is available and spidr._C was built with the CUDA kernels.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from spidr.ops import reference

REPO = Path(__file__).parent.parent
CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")
COMPILE_TIMEOUT_S = 900


# ----------------------------------------------------------------------------------------------
# nvcc compilation
# ----------------------------------------------------------------------------------------------


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and cpp_extension.CUDA_HOME:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    return nvcc


def torch_include_dirs() -> list[str]:
    try:
        try:
            return list(cpp_extension.include_paths(device_type="cuda"))
        except TypeError:  # older torch: include_paths(cuda=True)
            return list(cpp_extension.include_paths(cuda=True))
    except OSError:
        # A CPU build of torch has no CUDA_HOME; nvcc finds its own CUDA headers.
        return list(cpp_extension.include_paths())


def nvcc_command(nvcc: str, source: Path, output: Path, arch: str) -> list[str]:
    includes = [*torch_include_dirs(), sysconfig.get_paths()["include"]]
    command = [
        nvcc,
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-std=c++17",
        "-O3",
        "--expt-relaxed-constexpr",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    # CPU wheels of torch ship the c10/cuda headers but not the header CMake generates for them
    # (c10/cuda/impl/cuda_cmake_macros.h; on Linux it only matters for Windows DLL exports).
    if not any((Path(d) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for d in includes):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    command += [f"-I{d}" for d in includes]
    command += ["-Xcompiler", "-fPIC", "-c", str(source), "-o", str(output)]
    return command


@pytest.mark.slow
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_cuda_source_compiles(tmp_path, source, arch):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (and torch found no CUDA_HOME)")
    output = tmp_path / f"{source.stem}.sm_{arch}.o"
    result = subprocess.run(
        nvcc_command(nvcc, source, output, arch),
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
        check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed on {source.name} for sm_{arch}:\n{log[-6000:]}"
    assert output.is_file() and output.stat().st_size > 0
    # Warnings in torch's own headers are not ours; warnings in our sources are bugs.
    ours = [line for line in log.splitlines() if source.name in line and "warning" in line.lower()]
    assert not ours, "nvcc warnings in " + source.name + ":\n" + "\n".join(ours)


# ----------------------------------------------------------------------------------------------
# GPU parity with spidr.ops.reference
# ----------------------------------------------------------------------------------------------


def has_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import spidr._C  # noqa: F401 -- registers the operators
    except (ImportError, OSError):
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("spidr::assign_codes", "CUDA")
    except RuntimeError:  # the operator is not defined at all
        return False


requires_cuda_kernels = pytest.mark.skipif(
    not has_cuda_kernels(), reason="needs a CUDA device and spidr._C built with its CUDA kernels"
)
D = 768


@pytest.fixture(autouse=True)
def ieee_float32_matmul():
    # The reference and the kernels' cuBLAS calls must both run in true float32 (no TF32).
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def random_codebooks(c: int, k: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codebooks = torch.randn(c, k, d, generator=g)
    counts = torch.rand(c, k, generator=g) * 3 + 0.5
    return (codebooks * counts.unsqueeze(-1)).cuda(), counts.cuda()


def assert_same_assignment(x, codebooks, counts, labels, expected):
    """Labels equal, except where two codewords are closer than float32 rounding can separate."""
    assert labels.dtype == torch.int64 and labels.shape == expected.shape
    diff = (labels != expected).nonzero()
    if diff.numel() == 0:
        return
    assert diff.shape[0] <= max(1, expected.numel() // 1000), f"{diff.shape[0]} of {expected.numel()} labels differ"
    codewords = codebooks.double() / counts.double().unsqueeze(-1)
    norms = codewords.square().sum(-1)
    for c, n in diff.tolist():
        row = x[c, n].double()
        mine, ref = int(labels[c, n]), int(expected[c, n])
        gap = (norms[c, mine] - 2 * row @ codewords[c, mine]) - (norms[c, ref] - 2 * row @ codewords[c, ref])
        scale = 2 * row.norm() * norms[c].max().sqrt() + norms[c].max()
        assert abs(float(gap)) <= 1e-5 * float(scale), f"label ({c}, {n}): {mine} vs {ref}, gap {float(gap)}"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Close within rtol, relative to each entry or (for entries near zero) to the largest entry."""
    assert actual.shape == expected.shape
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n", [0, 3001])
@pytest.mark.parametrize("k", [67, 256])
@pytest.mark.parametrize("c", [1, 8])
@pytest.mark.gpu
@requires_cuda_kernels
def test_assign_codes_matches_reference(c, k, n, dtype):
    g = torch.Generator().manual_seed(1000 * c + k + n)
    codebooks, counts = random_codebooks(c, k, D, g)
    x = torch.randn(c, n, D, generator=g).to(dtype).cuda()
    labels = torch.ops.spidr.assign_codes(x, codebooks, counts)
    assert labels.shape == (c, n) and labels.device == x.device
    assert_same_assignment(x, codebooks, counts, labels, reference.assign_codes(x, codebooks, counts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", [67, 256])
@pytest.mark.parametrize("c", [1, 8])
@pytest.mark.gpu
@requires_cuda_kernels
def test_assign_codes_ties_go_to_lowest_index(c, k, dtype):
    g = torch.Generator().manual_seed(7 * c + k)
    half = k // 2
    base, base_counts = random_codebooks(c, half, D, g)
    # Codewords j, j + half (and 2 * half, a copy of codeword 0, when k is odd) are identical.
    codebooks = torch.cat([base, base, base[:, : k - 2 * half]], dim=1)
    counts = torch.cat([base_counts, base_counts, base_counts[:, : k - 2 * half]], dim=1)
    x = torch.randn(c, 3001, D, generator=g).to(dtype).cuda()
    labels = torch.ops.spidr.assign_codes(x, codebooks, counts)
    assert int(labels.max()) < half
    assert_same_assignment(x, codebooks, counts, labels, reference.assign_codes(x, codebooks, counts))
    exact = (base / base_counts.unsqueeze(-1)).to(dtype)  # every row equal to (a rounding of) a codeword
    labels = torch.ops.spidr.assign_codes(exact, codebooks, counts)
    assert torch.equal(labels, torch.arange(half, device=labels.device).expand(c, half))
    assert torch.equal(labels, reference.assign_codes(exact, codebooks, counts))


@pytest.mark.parametrize("spread", ["uniform", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n", [0, 3001])
@pytest.mark.parametrize("k", [67, 256])
@pytest.mark.parametrize("c", [1, 8])
@pytest.mark.gpu
@requires_cuda_kernels
def test_segment_sums_matches_reference(c, k, n, dtype, spread):
    g = torch.Generator().manual_seed(31 * c + k + n)
    x = torch.randn(c, n, D, generator=g).to(dtype).cuda()
    high = k if spread == "uniform" else 3  # skewed: a few codewords take every row
    labels = torch.randint(0, high, (c, n), generator=g).cuda()
    count, memory = torch.ops.spidr.segment_sums(x, labels, k)
    ref_count, ref_memory = reference.segment_sums(x, labels, k)
    assert count.dtype == memory.dtype == torch.float32
    assert torch.equal(count, ref_count)
    torch.testing.assert_close(memory, ref_memory, rtol=1e-5, atol=1e-4)
    again = torch.ops.spidr.segment_sums(x, labels, k)
    assert torch.equal(again[0], count) and torch.equal(again[1], memory)  # deterministic


def loss_inputs(c: int, k: int, n: int, shared: bool, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn((n, D) if shared else (c, n, D), generator=g).to(dtype).cuda()
    weight = (torch.randn(c, k, D, generator=g) * D**-0.5).cuda()
    bias = (torch.randn(c, k, generator=g) * 0.1).cuda()
    labels = torch.randint(0, k, (c, n), generator=g).cuda()
    return h, weight, bias, labels


def reference_loss(h, weight, bias, labels, grad_loss=None):
    """Loss, mean_probs and the gradients of (grad_loss * loss).sum(), computed on h's float32 values."""
    h_ref = h.float().requires_grad_()
    weight_ref = weight.clone().requires_grad_()
    bias_ref = bias.clone().requires_grad_()
    loss, mean_probs = reference.masked_prediction_loss(h_ref, weight_ref, bias_ref, labels)
    loss.backward(torch.ones_like(loss) if grad_loss is None else grad_loss)
    return loss.detach(), mean_probs, h_ref.grad, weight_ref.grad, bias_ref.grad


def h_rtol(h: torch.Tensor) -> float:
    # bfloat16 gradients carry bfloat16 rounding (one ulp is 2^-7 relative at worst).
    return 1e-4 if h.dtype == torch.float32 else 1e-2


LOSS_CASES = [pytest.param(c, k, n, id=f"C{c}-K{k}-N{n}") for c in (1, 8) for k in (67, 256) for n in (0, 3001, 4500)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_h", "per_head_h"])
@pytest.mark.parametrize(("c", "k", "n"), LOSS_CASES)
@pytest.mark.gpu
@requires_cuda_kernels
def test_mpl_forward_matches_reference(c, k, n, shared, dtype):
    h, weight, bias, labels = loss_inputs(c, k, n, shared, dtype, seed=c * k + n)
    loss, mean_probs, grad_h, grad_weight, grad_bias = torch.ops.spidr.mpl_forward(h, weight, bias, labels, True)
    ref_loss, ref_probs, ref_gh, ref_gw, ref_gb = reference_loss(h, weight, bias, labels)
    assert loss.shape == (n,) and loss.dtype == torch.float32
    assert mean_probs.shape == (c, k) and mean_probs.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert grad_h.dtype == h.dtype and grad_weight.dtype == weight.dtype and grad_bias.dtype == bias.dtype
    assert_close_rel(grad_h, ref_gh, h_rtol(h))
    assert_close_rel(grad_weight, ref_gw, 1e-4)
    assert_close_rel(grad_bias, ref_gb, 1e-4)

    # Without gradients: the same loss and probabilities, three empty tensors.
    out = torch.ops.spidr.mpl_forward(h, weight, bias, labels, False)
    assert torch.equal(out[0], loss) and torch.equal(out[1], mean_probs)
    assert [t.numel() for t in out[2:]] == [0, 0, 0]
    assert (out[2].dtype, out[3].dtype, out[4].dtype) == (h.dtype, weight.dtype, bias.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_h", "per_head_h"])
@pytest.mark.parametrize("grad", ["uniform", "random"])
@pytest.mark.parametrize(("c", "k", "n"), [(1, 67, 3001), (8, 256, 3001), (8, 67, 4500), (8, 256, 0)])
@pytest.mark.gpu
@requires_cuda_kernels
def test_mpl_backward_matches_reference(c, k, n, grad, shared, dtype):
    h, weight, bias, labels = loss_inputs(c, k, n, shared, dtype, seed=3 * c + k + n)
    g = torch.Generator().manual_seed(n + 1)
    if grad == "uniform":
        grad_loss = torch.full((n,), 0.37).cuda()
    else:
        grad_loss = (torch.rand(n, generator=g) * 2 - 0.5).cuda()
    _, _, ref_gh, ref_gw, ref_gb = reference_loss(h, weight, bias, labels, grad_loss)
    saved = torch.ops.spidr.mpl_forward(h, weight, bias, labels, True)[2:]
    empty = torch.ops.spidr.mpl_forward(h, weight, bias, labels, False)[2:]
    for grads in (saved, empty):  # scaled from the saved gradients, or recomputed
        grad_h, grad_weight, grad_bias = torch.ops.spidr.mpl_backward(grad_loss, h, weight, bias, labels, *grads)
        assert grad_h.dtype == h.dtype and grad_weight.dtype == weight.dtype and grad_bias.dtype == bias.dtype
        assert_close_rel(grad_h, ref_gh, h_rtol(h))
        assert_close_rel(grad_weight, ref_gw, 1e-4)
        assert_close_rel(grad_bias, ref_gb, 1e-4)
        for out, given in zip((grad_h, grad_weight, grad_bias), grads, strict=True):
            assert given.numel() == 0 or out.data_ptr() != given.data_ptr()  # new tensors, never the saved ones


@pytest.mark.gpu
@requires_cuda_kernels
def test_bad_arguments_raise():
    h, weight, bias, labels = loss_inputs(2, 8, 16, True, torch.float32, seed=0)
    codebooks, counts = random_codebooks(2, 8, D, torch.Generator().manual_seed(0))
    x = torch.randn(2, 16, D).cuda()
    ops = torch.ops.spidr
    with pytest.raises(RuntimeError, match="labels must be int64"):
        ops.segment_sums(x, labels.int(), 8)
    with pytest.raises(RuntimeError, match="same device"):
        ops.assign_codes(x, codebooks, counts.cpu())
    with pytest.raises(RuntimeError, match="codebooks must have shape"):
        ops.assign_codes(x[:, :, :10], codebooks, counts)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        ops.mpl_forward(h, weight, bias, labels[:, :5], True)
    with pytest.raises(RuntimeError, match="grad_loss must have shape"):
        ops.mpl_backward(torch.ones(3).cuda(), h, weight, bias, labels, h, weight, bias)
    # Still usable afterwards.
    assert ops.assign_codes(x, codebooks, counts).shape == (2, 16)
