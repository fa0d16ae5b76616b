"""Benchmark the three spidr.ops operations, every usable backend side by side in one process.

    python benchmarks/bench_ops.py                  # CPU, C=8 N=9500 D=768 K=256 (one 3.8 M-sample batch)
    python benchmarks/bench_ops.py --device cuda    # GPU rows: torch, release, triton, cuda, floor
    python benchmarks/bench_ops.py --quick          # small shapes, a smoke run

Rows per operation:
- ``torch``: our reference backend (plain PyTorch, no one-hot, one head's logits at a time);
- ``release``: the reference release's formulation, rewritten from SPEC 1.5/1.6 (addmm, argmin,
  one_hot, one_hot.T @ x; per-head Linear + log_softmax + sum(-onehot * logp), autograd);
- one row per compiled or Triton backend usable on the device;
- ``floor``: the float32 GEMMs the operation cannot avoid, into preallocated outputs (assignment:
  x @ c^T per codebook; loss: logits, grad_h and grad_weight GEMMs per head).
Times are the median of ``--repeats`` runs after a warm-up, with the spread (min-max); ``vs torch``
and ``vs floor`` are ratios of medians. Peak memory is the growth of the peak resident set during one
run (CPU: in a fresh subprocess per row, after a warm-up run, from /proc) or the CUDA peak allocation
during one run, beyond what was allocated before it: the op's working memory, gradients included.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

import spidr.ops as ops


@dataclass
class Row:
    op: str
    name: str
    median_s: float
    min_s: float
    max_s: float
    peak_mb: float | None = None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {torch.get_num_threads()} threads", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    return "; ".join(parts)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, float, float]:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


# ----------------------------------------------------------------------------- workloads
def make_inputs(c: int, n: int, d: int, k: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(c, n, d, generator=g)
    codebooks = torch.randn(c, k, d, generator=g) * 3
    counts = torch.full((c, k), 3.0)
    h = torch.randn(c, n, d, generator=g)
    weight = torch.randn(c, k, d, generator=g) * 0.02
    bias = torch.zeros(c, k)
    labels = torch.randint(0, k, (c, n), generator=g)
    tensors = dict(x=x, codebooks=codebooks, counts=counts, h=h, weight=weight, bias=bias, labels=labels)
    return {name: t.to(device) for name, t in tensors.items()}


def release_assign_update(inp: dict, decay: float = 0.9) -> None:
    """SPEC 1.5 as the release computes it: distances by addmm, argmin, one-hot GEMM for the sums."""
    codebooks, counts, x = inp["codebooks"].clone(), inp["counts"].clone(), inp["x"]
    k = codebooks.shape[1]
    for i in range(x.shape[0]):
        codewords = codebooks[i] / counts[i].unsqueeze(1)
        labels = torch.addmm(codewords.square().sum(1), x[i], codewords.t(), alpha=-2).argmin(1)
        onehot = F.one_hot(labels, k).float()
        count, memory = onehot.sum(0), onehot.t() @ x[i]
        alpha = torch.where(count != 0, decay, 1.0)
        counts[i] = alpha * counts[i] + (1 - alpha) * count
        codebooks[i] = alpha.unsqueeze(1) * codebooks[i] + (1 - alpha).unsqueeze(1) * memory


def backend_assign_update(name: str, inp: dict) -> Callable[[], None]:
    def run() -> None:
        codebooks, counts = inp["codebooks"].clone(), inp["counts"].clone()
        with ops.use_backend(name):
            labels = ops.assign_codes(inp["x"], codebooks, counts)
            ops.codebook_update_(codebooks, counts, inp["x"], labels, 0.9)

    return run


def floor_assign(inp: dict) -> Callable[[], None]:
    c, n, _ = inp["x"].shape
    codewords = (inp["codebooks"] / inp["counts"].unsqueeze(-1)).contiguous()
    out = torch.empty(n, codewords.shape[1], device=inp["x"].device)

    def run() -> None:
        for i in range(c):
            torch.mm(inp["x"][i], codewords[i].t(), out=out)

    return run


def loss_leaves(inp: dict) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Leaves made once; each call drops the previous gradients (so backward allocates them, as in training)."""
    leaves = tuple(inp[k].clone().requires_grad_() for k in ("h", "weight", "bias"))

    def fresh() -> tuple[torch.Tensor, ...]:
        for leaf in leaves:
            leaf.grad = None
        return leaves

    return fresh


def release_loss(inp: dict) -> Callable[[], None]:
    leaves = loss_leaves(inp)

    def run() -> None:
        h, weight, bias = leaves()
        k = weight.shape[1]
        losses = torch.zeros(h.shape[1], device=h.device)
        for i in range(weight.shape[0]):
            log_probs = torch.log_softmax(F.linear(h[i], weight[i], bias[i]), dim=-1)
            losses = losses + torch.sum(-F.one_hot(inp["labels"][i], k).float() * log_probs, dim=-1)
        (losses / weight.shape[0]).sum().backward()

    run.reset = leaves  # type: ignore[attr-defined]
    return run


def backend_loss(name: str, inp: dict) -> Callable[[], None]:
    leaves = loss_leaves(inp)

    def run() -> None:
        h, weight, bias = leaves()
        with ops.use_backend(name):
            loss, _ = ops.masked_prediction_loss(h, weight, bias, inp["labels"])
        loss.sum().backward()

    run.reset = leaves  # type: ignore[attr-defined]
    return run


def floor_loss(inp: dict) -> Callable[[], None]:
    h, weight = inp["h"], inp["weight"]
    c, n, d = h.shape
    k = weight.shape[1]
    logits = torch.empty(n, k, device=h.device)
    grad_h = torch.empty(n, d, device=h.device)
    grad_w = torch.empty(k, d, device=h.device)

    def run() -> None:
        for i in range(c):
            torch.mm(h[i], weight[i].t(), out=logits)
            torch.mm(logits, weight[i], out=grad_h)
            torch.mm(logits.t(), h[i], out=grad_w)

    return run


def workloads(inp: dict, device: str) -> list[tuple[str, str, Callable[[], object]]]:
    usable = ops.backends(device)
    rows: list[tuple[str, str, Callable[[], object]]] = []
    rows.append(("assign+update", "torch", backend_assign_update("torch", inp)))
    rows.append(("assign+update", "release", lambda: release_assign_update(inp)))
    rows += [("assign+update", b, backend_assign_update(b, inp)) for b in usable if b != "torch"]
    rows.append(("assign+update", "floor", floor_assign(inp)))
    rows.append(("loss fwd+bwd", "torch", backend_loss("torch", inp)))
    rows.append(("loss fwd+bwd", "release", release_loss(inp)))
    rows += [("loss fwd+bwd", b, backend_loss(b, inp)) for b in usable if b != "torch"]
    rows.append(("loss fwd+bwd", "floor", floor_loss(inp)))
    return rows


# ----------------------------------------------------------------------------- memory
def cpu_peak_mb(args: argparse.Namespace, op: str, name: str) -> float:
    """Peak RSS growth of one run of the row, in a fresh process (so earlier rows do not count)."""
    cmd = [sys.executable, __file__, "--measure", f"{op}|{name}", "--shape", *map(str, args.shape)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(args: argparse.Namespace) -> None:
    op, name = args.measure.split("|")
    inp = make_inputs(*args.shape, device="cpu")
    fn = next(f for o, n, f in workloads(inp, "cpu") if o == op and n == name)
    fn()  # warm-up: one-time allocations (extension, thread pools) are not the op's
    getattr(fn, "reset", lambda: None)()  # drop the warm-up's gradients: the measured run allocates them
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    fn()
    print((_status_kb("VmHWM") - base) / 1024)


def cuda_peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- report
def table(rows: list[Row], title: str) -> str:
    header = "| op | backend | median ms | spread ms | vs torch | vs floor | peak MB |"
    lines = [f"### {title}", "", header, "|---|---|---|---|---|---|---|"]
    for op in dict.fromkeys(r.op for r in rows):
        group = [r for r in rows if r.op == op]
        ref = next(r for r in group if r.name == "torch").median_s
        floor = next(r for r in group if r.name == "floor").median_s
        for r in group:
            peak = "" if r.peak_mb is None else f"{r.peak_mb:.0f}"
            lines.append(
                f"| {op} | {r.name} | {1e3 * r.median_s:.1f} | {1e3 * r.min_s:.1f}-{1e3 * r.max_s:.1f} | "
                f"{r.median_s / ref:.2f} | {r.median_s / floor:.2f} | {peak} |"
            )
    return "\n".join(lines)


def roofline(inp: dict, device: str, c: int, n: int, d: int, k: int, rows: list[Row]) -> str:
    """Measured GEMM rate and copy bandwidth of this device, and what the floors reach."""
    big = torch.empty(64 * 2**20 // 4, device=device)
    other = torch.empty_like(big)
    copy_s, _, _ = timed(lambda: other.copy_(big), device, 5)
    bandwidth = 2 * big.numel() * 4 / copy_s / 1e9
    floor_assign_s = next(r.median_s for r in rows if r.op == "assign+update" and r.name == "floor")
    floor_loss_s = next(r.median_s for r in rows if r.op == "loss fwd+bwd" and r.name == "floor")
    assign_flops = 2 * c * n * d * k
    return (
        f"Measured on this device: copy bandwidth {bandwidth:.0f} GB/s; float32 GEMM rate "
        f"{assign_flops / floor_assign_s / 1e12:.2f} TFLOP/s (assignment floor), "
        f"{3 * assign_flops / floor_loss_s / 1e12:.2f} TFLOP/s (loss floor)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 9500, 768, 256], metavar=("C", "N", "D", "K"))
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.shape, args.repeats = [2, 500, 64, 32], 2
    if args.measure:
        measure_one(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    c, n, d, k = args.shape
    inp = make_inputs(c, n, d, k, args.device)
    rows = []
    for op, name, fn in workloads(inp, args.device):
        median, low, high = timed(fn, args.device, args.repeats)
        peak = None
        if not args.no_memory:
            peak = cuda_peak_mb(fn) if args.device == "cuda" else cpu_peak_mb(args, op, name)
        rows.append(Row(op, name, median, low, high, peak))
    title = f"C={c} N={n} D={d} K={k}, {args.device}: {machine()}"
    print(table(rows, title))
    print()
    print(roofline(inp, args.device, c, n, d, k, rows))
    if args.json:
        args.json.write_text(json.dumps({"title": title, "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()
