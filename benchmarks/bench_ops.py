"""Benchmark the three spidr.ops operations, every usable backend side by side in one process.

    python benchmarks/bench_ops.py                  # CPU, C=8 N=9500 D=768 K=256 (one 3.8 M-sample batch)
    python benchmarks/bench_ops.py --device cuda    # GPU rows: torch, release, triton, cuda, floor
    python benchmarks/bench_ops.py --quick          # small shapes, a smoke run

Three tables: assignment + EMA update; the loss with h (C, N, D), one per head (SpidR); the loss with one
(N, D) h shared by all heads (DinoSR). Rows per table:
- ``torch``: our reference backend (plain PyTorch, no one-hot, one head's logits at a time);
- ``release``: the reference release's formulation, rewritten from SPEC 1.5/1.6 (addmm, argmin,
  one_hot, one_hot.T @ x; per-head Linear + log_softmax + sum(-onehot * logp), autograd);
- one row per compiled or Triton backend usable on the device;
- ``floor``: the float32 GEMMs the operation cannot avoid, into preallocated outputs (assignment:
  x @ c^T per codebook; loss: logits, grad_h and grad_weight GEMMs per head).
The rows of a table are timed in turn, round robin (each round runs every row once), so that a drift of
the machine's speed hits them alike. Times are the median of ``--repeats`` rounds after a warm-up, with the
spread (min-max); ``ratio`` (vs ``torch``, the reference row) is a ratio of medians and ``vs floor`` the
median over rounds of the row's time over the floor's time in the same round. Peak memory is the growth of the peak
resident set during one run (CPU: in a fresh subprocess per row, after a warm-up run, from /proc) or the CUDA
peak allocation during one run, beyond what was allocated before it: the op's working memory, gradients
included. ``python -m benchmarks --only ops`` runs the same three tables through :func:`run_suite`.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spidr.ops as ops
from benchmarks.harness import Row, Suite, machine_line, paired_ratio, time_interleaved, time_it

FULL_SHAPE = (8, 9500, 768, 256)  # C, N, D, K: one 3.8 M-sample batch
QUICK_SHAPE = (2, 500, 64, 32)
OPS = ("assign+update", "loss fwd+bwd", "loss fwd+bwd, shared h")
SHARED = "loss fwd+bwd, shared h"  # DinoSR: one (N, D) h for all heads; SpidR: (C, N, D), one per head


# ----------------------------------------------------------------------------- workloads
def make_inputs(c: int, n: int, d: int, k: int, device: str, seed: int = 0) -> dict:
    """Inputs of both ops; ``h`` is (C, N, D) (SpidR, one per head) and ``h_shared`` (N, D) (DinoSR)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(c, n, d, generator=g)
    codebooks = torch.randn(c, k, d, generator=g) * 3
    counts = torch.full((c, k), 3.0)
    h = torch.randn(c, n, d, generator=g)
    h_shared = h[0].clone()
    weight = torch.randn(c, k, d, generator=g) * 0.02
    bias = torch.zeros(c, k)
    labels = torch.randint(0, k, (c, n), generator=g)
    tensors = dict(
        x=x, codebooks=codebooks, counts=counts, h=h, h_shared=h_shared, weight=weight, bias=bias, labels=labels
    )
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


def loss_leaves(inp: dict, shared: bool = False) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Leaves made once; each call drops the previous gradients (so backward allocates them, as in training)."""
    leaves = tuple(inp[k].clone().requires_grad_() for k in ("h_shared" if shared else "h", "weight", "bias"))

    def fresh() -> tuple[torch.Tensor, ...]:
        for leaf in leaves:
            leaf.grad = None
        return leaves

    return fresh


def release_loss(inp: dict, shared: bool = False) -> Callable[[], None]:
    leaves = loss_leaves(inp, shared)

    def run() -> None:
        h, weight, bias = leaves()
        k = weight.shape[1]
        losses = torch.zeros(h.shape[-2], device=h.device)
        for i in range(weight.shape[0]):
            log_probs = torch.log_softmax(F.linear(h if shared else h[i], weight[i], bias[i]), dim=-1)
            losses = losses + torch.sum(-F.one_hot(inp["labels"][i], k).float() * log_probs, dim=-1)
        (losses / weight.shape[0]).sum().backward()

    run.reset = leaves  # type: ignore[attr-defined]
    return run


def backend_loss(name: str, inp: dict, shared: bool = False) -> Callable[[], None]:
    leaves = loss_leaves(inp, shared)

    def run() -> None:
        h, weight, bias = leaves()
        with ops.use_backend(name):
            loss, _ = ops.masked_prediction_loss(h, weight, bias, inp["labels"])
        loss.sum().backward()

    run.reset = leaves  # type: ignore[attr-defined]
    return run


def floor_loss(inp: dict, shared: bool = False) -> Callable[[], None]:
    h, weight = (inp["h_shared"] if shared else inp["h"]), inp["weight"]
    c, k, d = weight.shape
    n = h.shape[-2]
    logits = torch.empty(n, k, device=h.device)
    grad_h = torch.empty(n, d, device=h.device)
    grad_w = torch.empty(k, d, device=h.device)

    def run() -> None:
        for i in range(c):
            hi = h if shared else h[i]
            torch.mm(hi, weight[i].t(), out=logits)
            if shared and i > 0:  # one gradient of h for all heads: accumulated
                torch.addmm(grad_h, logits, weight[i], out=grad_h)
            else:
                torch.mm(logits, weight[i], out=grad_h)
            torch.mm(logits.t(), hi, out=grad_w)

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
    rows.append((SHARED, "torch", backend_loss("torch", inp, shared=True)))
    rows.append((SHARED, "release", release_loss(inp, shared=True)))
    rows += [(SHARED, b, backend_loss(b, inp, shared=True)) for b in usable if b != "torch"]
    rows.append((SHARED, "floor", floor_loss(inp, shared=True)))
    return rows


# ----------------------------------------------------------------------------- memory
def cpu_peak_mb(op: str, name: str, shape: Sequence[int]) -> float:
    """Peak RSS growth of one run of the row, in a fresh process (so earlier rows do not count)."""
    cmd = [sys.executable, __file__, "--measure", f"{op}|{name}", "--shape", *map(str, shape)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_one(row: str, shape: Sequence[int]) -> None:
    """Print the peak RSS growth (MB) of one run of ``row`` ("op|name"): the subprocess of :func:`cpu_peak_mb`."""
    op, name = row.split("|")
    inp = make_inputs(*shape, device="cpu")
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
def roofline(device: str, c: int, n: int, d: int, k: int, rows: list[tuple[str, Row]]) -> str:
    """Measured GEMM rate and copy bandwidth of this device, and what the floors reach."""
    big = torch.empty(64 * 2**20 // 4, device=device)
    other = torch.empty_like(big)
    copy_s, _, _ = time_it(lambda: other.copy_(big), repeats=5, device=device)
    bandwidth = 2 * big.numel() * 4 / copy_s / 1e9
    floor_assign_s = next(r.median_s for op, r in rows if op == "assign+update" and r.name == "floor")
    floor_loss_s = next(r.median_s for op, r in rows if op == "loss fwd+bwd" and r.name == "floor")
    assign_flops = 2 * c * n * d * k
    return (
        f"Measured on this device: copy bandwidth {bandwidth:.0f} GB/s; float32 GEMM rate "
        f"{assign_flops / floor_assign_s / 1e12:.2f} TFLOP/s (assignment floor), "
        f"{3 * assign_flops / floor_loss_s / 1e12:.2f} TFLOP/s (loss floor)."
    )


def run_suite(
    *,
    repeats: int = 5,
    quick: bool = False,
    device: str = "cpu",
    shape: Sequence[int] | None = None,
    memory: bool | None = None,
) -> list[Suite]:
    """Time every row of both operations; three tables (assign+update, loss with h per head, with a shared h).

    Args:
        repeats: timed runs per row after one warm-up.
        quick: small shapes (:data:`QUICK_SHAPE`), a smoke run.
        device: ``"cpu"`` or ``"cuda"``.
        shape: (C, N, D, K), overriding the default of ``quick``.
        memory: measure each row's peak memory (default: unless ``quick``; on the CPU it costs a subprocess
            per row).

    The rows of each table are timed round robin (:func:`benchmarks.harness.time_interleaved`). Each row's
    ``extra`` holds ``vs floor`` (the median over rounds of its time over the floor's) and ``peak MB``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    c, n, d, k = shape or (QUICK_SHAPE if quick else FULL_SHAPE)
    memory = not quick if memory is None else memory
    inp = make_inputs(c, n, d, k, device)
    rows: list[tuple[str, Row]] = []
    timed = workloads(inp, device)
    times: dict[tuple[str, str], list[float]] = {}
    for op in OPS:
        fns = {name: fn for o, name, fn in timed if o == op}
        times.update({(op, name): t for name, t in time_interleaved(fns, repeats=repeats, device=device).items()})
    for op, name, fn in timed:
        t = times[(op, name)]
        row = Row.from_times(name, t)
        row.extra["vs floor"] = round(paired_ratio(t, times[(op, "floor")]), 2)
        if memory:
            peak = cuda_peak_mb(fn) if device == "cuda" else cpu_peak_mb(op, name, (c, n, d, k))
            row.extra["peak MB"] = round(peak, 1)
            if op != "assign+update" and name != "floor":
                # Beyond the gradients of h, weight and bias every path must return (float32).
                h_numel = n * d if op == SHARED else c * n * d
                grads_mb = (h_numel + c * k * d + c * k) * 4 / 2**20
                row.extra["beyond grads MB"] = round(max(0.0, peak - grads_mb), 1)
        rows.append((op, row))
    note = roofline(device, c, n, d, k, rows)
    suites = []
    for op in OPS:
        group = [r for o, r in rows if o == op]
        what = {
            "assign+update": "assignment + EMA update",
            "loss fwd+bwd": "masked-prediction loss, forward + backward, h (C, N, D) (SpidR)",
            SHARED: "masked-prediction loss, forward + backward, shared h (N, D) (DinoSR)",
        }[op]
        notes = [
            f"C={c} N={n} D={d} K={k}, float32, {device}. Rows timed round robin; median of {repeats} rounds after "
            "a warm-up; vs floor: median over rounds of the row's time / the floor's in the same round. `release`: "
            "the release's formulation rewritten from SPEC 1.5/1.6; `floor`: the float32 GEMMs the operation cannot "
            "avoid, into preallocated outputs."
            + ("" if memory else " Peak memory not measured (--quick or --no-memory).")
        ]
        if memory and op != "assign+update":
            notes.append(
                "peak MB: growth of the peak resident set (CPU) or of the peak allocation (CUDA) during one run, "
                "gradients included; beyond grads MB: the same less the float32 gradients of h, weight and bias "
                "that every row returns (the op's working memory)."
            )
        if op == OPS[-1]:
            notes.append(note)
        suites.append(
            Suite(
                name=f"ops/{op}",
                title=f"spidr.ops {what}, C={c} N={n} D={d} K={k}, {device}",
                rows=group,
                reference="torch",
                notes=notes,
            ).finish()
        )
    return suites


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=list(FULL_SHAPE),
        metavar=("C", "N", "D", "K"),
        help="default 8 9500 768 256",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (2 500 64 32), 2 repeats, no memory")
    parser.add_argument("--repeats", type=int, help="timed runs per row after a warm-up (default 5; 2 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the tables as JSON to OUT")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape = list(QUICK_SHAPE)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.measure:
        measure_one(args.measure, args.shape)
        return
    suites = run_suite(
        repeats=args.repeats,
        quick=args.quick,
        device=args.device,
        shape=args.shape,
        memory=False if args.no_memory or args.quick else None,
    )
    print(machine_line())
    for suite in suites:
        print()
        print(suite.markdown())
    if args.json:
        payload = {"machine": machine_line(), "suites": [suite.to_dict() for suite in suites]}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
