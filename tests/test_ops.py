"""spidr.ops: contract of the three ops on every usable backend, against brute-force formulas."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import spidr.ops as ops
from spidr.ops import reference

BACKENDS = ops.backends("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


def brute_force_labels(x, codebooks, counts):
    codewords = codebooks.float() / counts.float().unsqueeze(-1)
    distances = torch.cdist(x.double(), codewords.double()) ** 2
    return distances.argmin(-1)


def random_codebooks(c, k, d, generator):
    codebooks = torch.randn(c, k, d, generator=generator)
    counts = torch.rand(c, k, generator=generator) * 3 + 0.5
    return codebooks * counts.unsqueeze(-1), counts


@pytest.mark.parametrize(("c", "n", "k", "d"), [(1, 37, 5, 3), (8, 300, 67, 768), (2, 129, 256, 64)])
def test_assign_codes_matches_brute_force(backend, c, n, k, d):
    g = torch.Generator().manual_seed(c * n + k)
    codebooks, counts = random_codebooks(c, k, d, g)
    x = torch.randn(c, n, d, generator=g)
    labels = ops.assign_codes(x, codebooks, counts)
    assert labels.dtype == torch.int64 and labels.shape == (c, n)
    assert torch.equal(labels, brute_force_labels(x, codebooks, counts))
    assert ops.last_backend() == backend


def test_assign_codes_ties_go_to_lowest_index(backend):
    g = torch.Generator().manual_seed(0)
    base, counts = random_codebooks(2, 6, 16, g)
    codebooks = torch.cat([base, base], dim=1)  # codeword j and j + 6 are identical
    counts = torch.cat([counts, counts], dim=1)
    x = torch.randn(2, 50, 16, generator=g)
    labels = ops.assign_codes(x, codebooks, counts)
    assert int(labels.max()) < 6
    exact = (base / counts[:, :6].unsqueeze(-1))[:, :3]  # rows equal to a codeword
    labels = ops.assign_codes(exact, codebooks, counts)
    assert torch.equal(labels, torch.arange(3).expand(2, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_assign_codes_computes_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(1)
    codebooks, counts = random_codebooks(3, 40, 32, g)
    x = torch.randn(3, 100, 32, generator=g).to(dtype)
    labels = ops.assign_codes(x, codebooks, counts)
    assert torch.equal(labels, brute_force_labels(x.float(), codebooks, counts))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ops.assign_codes(x, codebooks, counts), labels)


def test_empty_inputs(backend):
    codebooks, counts = random_codebooks(2, 8, 4, torch.Generator().manual_seed(2))
    x = torch.zeros(2, 0, 4)
    labels = ops.assign_codes(x, codebooks, counts)
    assert labels.shape == (2, 0)
    before = codebooks.clone(), counts.clone()
    ops.codebook_update_(codebooks, counts, x, labels, 0.9)
    assert torch.equal(codebooks, before[0]) and torch.equal(counts, before[1])
    weight, bias = torch.randn(2, 8, 4, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    loss, mean_probs = ops.masked_prediction_loss(x.requires_grad_(), weight, bias, labels)
    assert loss.shape == (0,) and mean_probs.shape == (2, 8)
    loss.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def one_hot_update(codebooks, counts, x, labels, decay):
    """The release's formulation (SPEC 1.5): one-hot counts and sums, decayed where count > 0."""
    onehot = F.one_hot(labels, codebooks.shape[1]).float()
    count = onehot.sum(1)
    memory = onehot.transpose(1, 2) @ x.float()
    alpha = torch.where(count != 0, decay, 1.0)
    return alpha.unsqueeze(-1) * codebooks + (1 - alpha).unsqueeze(-1) * memory, alpha * counts + (1 - alpha) * count


@pytest.mark.parametrize(("c", "n", "k", "d"), [(1, 10, 300, 8), (8, 500, 67, 768)])
def test_codebook_update_matches_one_hot_formula(backend, c, n, k, d):
    g = torch.Generator().manual_seed(n)
    codebooks, counts = random_codebooks(c, k, d, g)
    x = torch.randn(c, n, d, generator=g)
    labels = torch.randint(0, k // 2, (c, n), generator=g)  # the upper half of codewords gets nothing
    expected_codebooks, expected_counts = one_hot_update(codebooks, counts, x, labels, 0.9)
    untouched = codebooks[:, k // 2 :].clone(), counts[:, k // 2 :].clone()
    ops.codebook_update_(codebooks, counts, x, labels, 0.9)
    torch.testing.assert_close(codebooks, expected_codebooks, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(counts, expected_counts, atol=1e-6, rtol=0)
    assert torch.equal(codebooks[:, k // 2 :], untouched[0]) and torch.equal(counts[:, k // 2 :], untouched[1])


def test_codebook_update_accepts_bfloat16_vectors(backend):
    g = torch.Generator().manual_seed(5)
    codebooks, counts = random_codebooks(2, 16, 32, g)
    x = torch.randn(2, 64, 32, generator=g).bfloat16()
    labels = torch.randint(0, 16, (2, 64), generator=g)
    expected = one_hot_update(codebooks, counts, x.float(), labels, 0.5)
    ops.codebook_update_(codebooks, counts, x, labels, 0.5)
    torch.testing.assert_close(codebooks, expected[0], atol=1e-5, rtol=1e-6)


def naive_loss(h, weight, bias, labels):
    c = weight.shape[0]
    per_head = []
    for i in range(c):
        hi = h[i] if h.dim() == 3 else h
        log_probs = torch.log_softmax(hi @ weight[i].t() + bias[i], dim=-1)
        per_head.append(-log_probs.gather(1, labels[i].unsqueeze(1)).squeeze(1))
    return torch.stack(per_head).mean(0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_h", "per_head_h"])
@pytest.mark.parametrize(("c", "n", "k", "d"), [(1, 33, 7, 5), (8, 200, 67, 768)])
def test_masked_prediction_loss_and_gradients(backend, shared, c, n, k, d):
    g = torch.Generator().manual_seed(c + n)
    h = torch.randn(*((n, d) if shared else (c, n, d)), generator=g, requires_grad=True)
    weight = (torch.randn(c, k, d, generator=g) * 0.05).requires_grad_()
    bias = torch.randn(c, k, generator=g).requires_grad_()
    labels = torch.randint(0, k, (c, n), generator=g)
    loss, mean_probs = ops.masked_prediction_loss(h, weight, bias, labels)
    expected = naive_loss(h, weight, bias, labels)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert not mean_probs.requires_grad
    probs = torch.stack([torch.softmax((h[i] if h.dim() == 3 else h) @ weight[i].t() + bias[i], -1) for i in range(c)])
    torch.testing.assert_close(mean_probs, probs.mean(1).detach(), atol=1e-6, rtol=1e-5)
    upstream = torch.rand(n, generator=g)
    grads = torch.autograd.grad((loss * upstream).sum(), (h, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (h, weight, bias))
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["shared_h", "per_head_h"])
def test_masked_prediction_loss_gradcheck(shared):
    g = torch.Generator().manual_seed(3)
    c, n, k, d = 3, 6, 5, 4
    h = torch.randn(*((n, d) if shared else (c, n, d)), generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, k, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, k, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, k, (c, n), generator=g)
    with ops.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: reference.masked_prediction_loss(h, w, b, labels)[0].double(), (h, weight, bias)
        )


def test_large_gradient_of_h_is_an_ordinary_tensor(backend):
    """A grad_h above the huge-page threshold (8 MiB): right values, accumulates, saves, resizes."""
    g = torch.Generator().manual_seed(11)
    c, n, k, d = 8, 1300, 64, 256  # grad_h: 10.6 MB
    h = torch.randn(c, n, d, generator=g, requires_grad=True)
    weight = (torch.randn(c, k, d, generator=g) * 0.05).requires_grad_()
    bias = torch.randn(c, k, generator=g).requires_grad_()
    labels = torch.randint(0, k, (c, n), generator=g)
    expected = torch.autograd.grad(naive_loss(h, weight, bias, labels).sum(), h)[0]
    for _ in range(2):  # the second backward accumulates into the first's h.grad
        ops.masked_prediction_loss(h, weight, bias, labels)[0].sum().backward()
    torch.testing.assert_close(h.grad, 2 * expected, atol=1e-6, rtol=1e-4)
    buffer = __import__("io").BytesIO()
    torch.save(h.grad, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), h.grad)
    h.grad = None
    ops.masked_prediction_loss(h, weight, bias, labels)[0].sum().backward()
    grad = h.grad
    del h.grad  # the loss's buffer must be freed without the library holding on to it
    assert grad.clone().resize_(4).numel() == 4


def test_loss_backward_keeps_one_gradient_of_h_alive(tmp_path):
    """Peak resident memory of forward + backward: grad_h once (no second copy, no zeros materialised)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import gc, pathlib, sys, torch
        import spidr.ops as ops
        def rss_kb(field):
            for line in pathlib.Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        c, n, k, d = 8, 4000, 64, 256
        h = torch.randn(c, n, d, requires_grad=True)
        weight = (torch.randn(c, k, d) * 0.05).requires_grad_()
        bias = torch.zeros(c, k, requires_grad=True)
        labels = torch.randint(0, k, (c, n))
        def step():
            h.grad = weight.grad = bias.grad = None
            with ops.use_backend(sys.argv[1]):
                ops.masked_prediction_loss(h, weight, bias, labels)[0].sum().backward()
        step()
        h.grad = weight.grad = bias.grad = None
        gc.collect()
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        base = rss_kb("VmRSS")
        step()
        print((rss_kb("VmHWM") - base) * 1024 / h.numel() / 4)
        """
    )
    path = tmp_path / "probe.py"
    path.write_text(script)
    if not __import__("os").path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    for name in [b for b in BACKENDS if b != "torch"]:
        out = subprocess.run([sys.executable, str(path), name], capture_output=True, text=True, check=True)
        ratio = float(out.stdout.strip().splitlines()[-1])
        # grad_h is 32.8 MB; the logits buffer (4 MiB), grad_weight and small buffers come on top.
        assert ratio < 1.45, f"{name}: peak memory {ratio:.2f}x grad_h"


def test_loss_under_bfloat16_autocast_backpropagates(backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 30, 16, generator=g, requires_grad=True)
    weight = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    bias = torch.randn(2, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 30), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = ops.masked_prediction_loss(h.bfloat16(), weight, bias, labels)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert h.grad is not None and weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(loss, naive_loss(h, weight, bias, labels), atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------- registry
def test_registry_lists_and_forces_backends(monkeypatch):
    assert "torch" in ops.backends("cpu") and "torch" in ops.backends("cuda")
    cpu = ops.backends("cpu")
    assert cpu[0] == ("cpp" if "cpp" in ops.registered() else "torch")  # compiled kernels first on the CPU
    if "triton" in cpu:  # interpreted on the CPU: only when forced
        assert cpu.index("triton") > cpu.index("torch")
    x, (codebooks, counts) = torch.randn(1, 4, 3), random_codebooks(1, 5, 3, torch.Generator().manual_seed(0))
    with ops.use_backend("torch"):
        ops.assign_codes(x, codebooks, counts)
    assert ops.last_backend() == "torch"
    monkeypatch.setenv("SPIDR_OPS_BACKEND", "torch")
    ops.assign_codes(x, codebooks, counts)
    assert ops.last_backend() == "torch"


def test_forcing_an_unusable_backend_raises(monkeypatch):
    with pytest.raises(ops.BackendError, match="'nonsense' is unknown"), ops.use_backend("nonsense"):
        pass
    x, (codebooks, counts) = torch.randn(1, 4, 3), random_codebooks(1, 5, 3, torch.Generator().manual_seed(0))
    monkeypatch.setenv("SPIDR_OPS_BACKEND", "nonsense")
    with pytest.raises(ops.BackendError, match="SPIDR_OPS_BACKEND"):
        ops.assign_codes(x, codebooks, counts)
    if "cuda" not in ops.registered():
        monkeypatch.setenv("SPIDR_OPS_BACKEND", "cuda")
        with pytest.raises(ops.BackendError, match="'cuda'.*not built or not available"):
            ops.assign_codes(x, codebooks, counts)


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    codebooks, counts = random_codebooks(2, 8, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(5, 4\)"):
        ops.assign_codes(torch.randn(5, 4), codebooks, counts)
    with pytest.raises(ValueError, match=r"codebooks must have shape \(C=3, K, D=4\)"):
        ops.assign_codes(torch.randn(3, 5, 4), codebooks, counts)
    with pytest.raises(ValueError, match=r"counts must have shape \(C=2, K=8\)"):
        ops.assign_codes(torch.randn(2, 5, 4), codebooks, counts[:, :3])
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.assign_codes(torch.ones(2, 5, 4, dtype=torch.int32), codebooks, counts)
    with pytest.raises(TypeError, match="labels must have dtype int64"):
        ops.codebook_update_(codebooks, counts, torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.int32), 0.9)
    with pytest.raises(ValueError, match=r"labels must have shape \(C, N\) = \(2, 5\)"):
        ops.codebook_update_(codebooks, counts, torch.randn(2, 5, 4), torch.zeros(2, 6, dtype=torch.int64), 0.9)
    with pytest.raises(ValueError, match="decay must be in"):
        ops.codebook_update_(codebooks, counts, torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.int64), 1.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(C=2, K=8\)"):
        ops.masked_prediction_loss(
            torch.randn(5, 4), codebooks, torch.zeros(2, 7), torch.zeros(2, 5, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match=r"h must have D=4"):
        ops.masked_prediction_loss(torch.randn(5, 3), codebooks, counts, torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.assign_codes([[1.0]], codebooks, counts)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dim", [512, 768, 64])
def test_layer_norm_gelu_in_place_equals_pytorch(affine, dim):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 257, dim, generator=g) * 4 + 1
    weight = torch.randn(dim, generator=g) if affine else None
    bias = torch.randn(dim, generator=g) if affine else None
    expected = F.gelu(F.layer_norm(x, (dim,), weight, bias, 1e-5))
    y = x.clone()
    out = ops.layer_norm_gelu_(y, weight, bias, 1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if "cpp" in BACKENDS:
        assert out.data_ptr() == y.data_ptr()  # fused: in place
    with ops.use_backend("torch"):
        torch.testing.assert_close(ops.layer_norm_gelu_(x.clone(), weight, bias, 1e-5), expected, atol=0, rtol=0)


def test_layer_norm_gelu_takes_pytorch_where_the_kernel_does_not_apply():
    x = torch.randn(40, 48)
    for arg in (x.t(), x.to(torch.bfloat16), torch.randn(5, 20)):  # not contiguous, not float32, D % 16 != 0
        expected = F.gelu(F.layer_norm(arg, arg.shape[-1:], None, None, 1e-5))
        torch.testing.assert_close(ops.layer_norm_gelu_(arg.clone(), None, None, 1e-5), expected)
    leaf = torch.randn(4, 32, requires_grad=True)
    ops.layer_norm_gelu_(leaf * 1, None, None, 1e-5).sum().backward()  # recorded by autograd: PyTorch's ops
    assert leaf.grad is not None


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp kernels are not built")
def test_layer_norm_gelu_kernel_checks_its_arguments():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.spidr.layer_norm_gelu_(torch.zeros(2, 16, dtype=torch.float64), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.spidr.layer_norm_gelu_(torch.zeros(2, 20), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.spidr.layer_norm_gelu_(torch.zeros(2, 16), torch.ones(8), None, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.spidr.layer_norm_gelu_(torch.zeros(16, 32).t(), None, None, 1e-5)


def _conv_block_reference(x, conv_weight, conv_bias, weight, bias, normalize):
    y = F.conv1d(
        x.transpose(1, 2).double(), conv_weight.double(), None if conv_bias is None else conv_bias.double(), 2
    )
    y = y.transpose(1, 2)
    if normalize:
        y = F.layer_norm(
            y, y.shape[-1:], None if weight is None else weight.double(), None if bias is None else bias.double()
        )
    return F.gelu(y).float()


# Input lengths: 3 frames (one output), outputs 1 to 5 around the tiles of three, and one past a chunk of
# 512 tiles (1536 outputs) with a partial last tile.
@pytest.mark.parametrize("frames", [3, 4, 5, 7, 9, 11, 3200])
@pytest.mark.parametrize(
    ("normalize", "affine", "with_bias"), [(True, True, False), (True, False, True), (False, False, True)]
)
def test_conv_k3s2_gelu_equals_conv_norm_gelu(frames, normalize, affine, with_bias):
    g = torch.Generator().manual_seed(frames)
    c_in, c_out = 32, 48
    x = torch.randn(2, frames, c_in, generator=g)
    conv_weight = torch.randn(c_out, c_in, 3, generator=g) / 8
    conv_bias = torch.randn(c_out, generator=g) if with_bias else None
    weight = torch.randn(c_out, generator=g) if affine else None
    bias = torch.randn(c_out, generator=g) if affine else None
    expected = _conv_block_reference(x, conv_weight, conv_bias, weight, bias, normalize)
    with torch.inference_mode():
        got = ops.conv_k3s2_gelu(x, conv_weight, conv_bias, weight, bias, 1e-5, normalize=normalize)
    assert got.shape == (2, (frames - 3) // 2 + 1, c_out)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    with ops.use_backend("torch"), torch.inference_mode():  # PyTorch's conv, norm and GELU
        torch.testing.assert_close(
            ops.conv_k3s2_gelu(x, conv_weight, conv_bias, weight, bias, 1e-5, normalize=normalize),
            expected,
            atol=2e-5,
            rtol=1e-5,
        )


def test_conv_k3s2_gelu_runs_pytorch_under_autograd_and_checks_shapes():
    x = torch.randn(1, 20, 16, requires_grad=True)
    conv_weight = torch.randn(16, 16, 3)
    out = ops.conv_k3s2_gelu(x, conv_weight, None, None, None, 1e-5)
    out.sum().backward()  # recorded by autograd: PyTorch's ops ran
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(ValueError, match="conv_weight"):
        ops.conv_k3s2_gelu(x.detach(), torch.randn(16, 16, 5), None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"\(out, in, 3\)"):
        ops.conv_k3s2_taps(torch.randn(16, 16, 2))
    w = torch.randn(8, 4, 3)
    taps = ops.conv_k3s2_taps(w)
    assert taps.shape == (5, 4, 8) and taps.is_contiguous()
    torch.testing.assert_close(taps[0], w[:, :, 1].t())
    torch.testing.assert_close(taps[2] + taps[3], w[:, :, 0].t())
    torch.testing.assert_close(taps[2] - taps[3], w[:, :, 2].t())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp kernels are not built")
def test_conv_k3s2_gelu_kernel_checks_its_arguments():
    x, taps = torch.zeros(1, 9, 16), torch.zeros(5, 16, 32)
    op = torch.ops.spidr.conv_k3s2_gelu
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), taps, None, True, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="taps must be"):
        op(x, torch.zeros(4, 16, 32), None, True, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        op(torch.zeros(1, 9, 8), torch.zeros(5, 8, 32), None, True, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="fewer than the kernel"):
        op(torch.zeros(1, 2, 16), taps, None, True, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="conv_bias must be"):
        op(x, taps, torch.zeros(16), True, None, None, 1e-5)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp kernels are not built")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_fused_extraction_kernels_pass_opcheck(affine):
    """Schema, fake (meta) implementation and AOT dispatch of the two fused helpers' kernels."""
    g = torch.Generator().manual_seed(0)
    params = (torch.randn(48, generator=g), torch.randn(48, generator=g)) if affine else (None, None)
    x = torch.randn(2, 9, 32, generator=g)
    taps = ops.conv_k3s2_taps(torch.randn(48, 32, 3, generator=g))
    torch.library.opcheck(torch.ops.spidr.conv_k3s2_gelu.default, (x, taps, params[0], affine, *params, 1e-5))
    rows = torch.randn(5, 48, generator=g)
    torch.library.opcheck(torch.ops.spidr.layer_norm_gelu_.default, (rows, *params, 1e-5))
    with torch.device("meta"):  # the fakes give the kernels' shapes
        out = torch.ops.spidr.conv_k3s2_gelu(
            torch.empty(2, 9, 32), torch.empty(5, 32, 48), None, False, None, None, 0.0
        )
    assert out.shape == (2, 4, 48) and out.dtype == torch.float32
