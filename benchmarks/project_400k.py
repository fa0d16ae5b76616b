"""FLOPs of one base SpidR training step at 3.8 M samples per GPU, the paper's utilisation, and a projection.

    python benchmarks/project_400k.py                                   # FLOP table + the paper's MFU
    python benchmarks/project_400k.py --step-seconds 0.12 --samples 3800000 --gpus 16
    python benchmarks/project_400k.py --measure --device cuda --compile --batch 19 --utterance-samples 200000

1. FLOPs of one training step on one GPU (multiply-adds count 2), per component: the conv feature extractor
   (each layer 2 x kernel x in x out x output frames), the feature projection, the student and teacher
   transformers on all frames (QKV, attention scores and weighted sum, output projection, feed-forward, the
   grouped positional convolutions; the student sees masked inputs but computes every frame), the prediction
   heads and the codebook distances on the masked frames only, and the elementwise optimiser, clipping and
   EMA. Backward = 2 x forward for the trainable parts (student, heads, and the extractor and projection
   until they are frozen at ``freeze_step``; the teacher and the codebooks have no backward). Norms, GELU,
   softmax and dropout are elementwise and not counted (their estimated share is printed).
2. From the paper's figures (SPEC 4: 400k steps in 23 h on 16 A100 and 15 h on 16 H100 with torch.compile,
   29 h and 19 h without), the step time and the model-FLOP utilisation (MFU) they imply against the bf16
   dense peaks (A100 312 TFLOP/s, H100 SXM 989 TFLOP/s).
3. Given a measured step time (``--step-seconds S`` at ``--samples M`` per step, or ``--measure`` running
   bench_step's ``ours`` row at ``--batch`` x ``--utterance-samples``), the projected hours for 400k steps:
   the step time is scaled linearly from M to 3.8 M samples and the GPUs run data parallel at the same
   per-GPU batch, so hours = steps x step time whatever ``--gpus`` (communication ignored).

Batch assumptions: the sampler fills a batch with files of nearly the same length (1000 length buckets) up
to 3.8 M samples and crops them to the shortest (no padding), capped at 320000 samples (20 s). We take
utterances of ``--utterance-samples`` (default 200000 = 12.5 s, about LibriSpeech 960 h's mean of 12.3 s),
19 of them per 3.8 M samples (a fractional count scales the cost linearly); 20 ms frames (624 per 12.5 s).
The masked fraction is that of our mask generator (mask_prob 0.8, spans of 10 frames, overlapping, each row
subsampled to the batch's smallest count): about 0.54, not 0.8, because spans overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import machine_line
from spidr.config import DinoSRConfig, MaskingConfig, SpidRConfig
from spidr.data.masks import MaskGenerator
from spidr.models import DinoSR, SpidR
from spidr.models.components import num_frames

STEPS = 400_000
SAMPLES_PER_GPU = 3_800_000
UTTERANCE_SAMPLES = 200_000
SAMPLE_RATE = 16_000
PEAK_BF16_DENSE = {"A100": 312e12, "H100": 989e12}  # FLOP/s: A100 SXM/PCIe and H100 SXM, bf16 dense (no sparsity)
# SPEC 4: (GPU, GPUs, torch.compile, hours for 400k steps).
PAPER = [("A100", 16, True, 23.0), ("H100", 16, True, 15.0), ("A100", 16, False, 29.0), ("H100", 16, False, 19.0)]
COMPONENTS = (
    "extractor",
    "projection",
    "student.pos_conv",
    "student.layers",
    "teacher.pos_conv",
    "teacher.layers",
    "heads",
    "codebooks",
)
ELEMENTWISE_FLOPS = 20  # rough cost per activation element of a norm + exact GELU (erf), for the share estimate


@dataclass(frozen=True)
class Layout:
    """How ``samples`` per GPU are split: ``utterances`` of ``utterance_samples``, ``frames`` and ``masked`` each."""

    samples: float
    utterance_samples: int
    utterances: float
    frames: int
    masked: float
    mask_fraction: float


def measured_mask_fraction(frames: int, rows: int, *, seed: int = 0) -> float:
    """Masked fraction of our mask generator for ``rows`` rows of ``frames`` frames (the masking defaults)."""
    padding_mask = torch.zeros((rows, frames), dtype=torch.bool)
    mask, _ = MaskGenerator(MaskingConfig())(padding_mask, generator=torch.Generator().manual_seed(seed))
    assert mask is not None  # mask_prob > 0 by default
    return mask.shape[1] / frames


def batch_layout(
    config: DinoSRConfig,
    samples_per_gpu: float = SAMPLES_PER_GPU,
    *,
    utterance_samples: int = UTTERANCE_SAMPLES,
    mask_fraction: float | None = None,
) -> Layout:
    """Utterances, frames per utterance and masked frames per utterance of one GPU's batch.

    Raises:
        ValueError: an utterance too short for one frame, or a non-positive sample count.
    """
    if samples_per_gpu <= 0 or utterance_samples <= 0:
        raise ValueError("samples_per_gpu and utterance_samples must be positive")
    frames = num_frames(utterance_samples, config.extractor_conv_layer_config)
    if frames == 0:
        raise ValueError(f"{utterance_samples} samples give no frame")
    utterances = samples_per_gpu / utterance_samples
    if mask_fraction is None:
        mask_fraction = measured_mask_fraction(frames, max(1, math.ceil(utterances)))
    return Layout(
        samples=float(samples_per_gpu),
        utterance_samples=utterance_samples,
        utterances=utterances,
        frames=frames,
        masked=mask_fraction * frames,
        mask_fraction=mask_fraction,
    )


def parameter_counts(config: DinoSRConfig) -> dict[str, int]:
    """Parameters of the model built on the meta device: student side, trainable ones, extractor side, teacher."""
    with torch.device("meta"):
        model = SpidR(config) if isinstance(config, SpidRConfig) else DinoSR(config)
    counts = {"trainable": 0, "extractor+projection": 0, "teacher": 0}
    for name, param in model.named_parameters():
        if name.startswith("teacher."):
            counts["teacher"] += param.numel()
        elif param.requires_grad:
            counts["trainable"] += param.numel()
            if name.startswith(("feature_extractor.", "feature_projection.")):
                counts["extractor+projection"] += param.numel()
    return counts


def _encoder_flops(config: DinoSRConfig, frames: int) -> tuple[float, float]:
    """Forward FLOPs of one encoder on one utterance: (positional convs, transformer layers)."""
    d, ff, t = config.encoder_embed_dim, config.encoder_ff_interm_features, frames
    depth = config.encoder_pos_conv_depth
    kernel = max(3, config.encoder_pos_conv_kernel // depth)
    conv_out = t + (1 if kernel % 2 == 0 else 0)  # even kernels give one extra frame, dropped afterwards
    pos = depth * 2 * kernel * (d // config.encoder_pos_conv_groups) * d * conv_out
    per_layer = (
        2 * t * d * 3 * d  # fused qkv projection
        + 2 * t * t * d  # attention scores q k^T, all heads
        + 2 * t * t * d  # weighted sum of the values
        + 2 * t * d * d  # output projection
        + 2 * 2 * t * d * ff  # feed-forward, two linears
    )
    return float(pos), float(config.encoder_num_layers * per_layer)


def _extractor_flops(config: DinoSRConfig, samples: int) -> tuple[float, float]:
    """(forward FLOPs of the conv extractor on one utterance, activation elements it produces)."""
    flops, elements, n, c_in = 0.0, 0.0, samples, 1
    for c_out, kernel, stride in config.extractor_conv_layer_config:
        n = max(0, (n - kernel) // stride + 1)
        flops += 2 * kernel * c_in * c_out * n
        elements += c_out * n
        c_in = c_out
    return flops, elements


def count_flops(
    config: DinoSRConfig,
    samples_per_gpu: float = SAMPLES_PER_GPU,
    *,
    utterance_samples: int = UTTERANCE_SAMPLES,
    mask_fraction: float | None = None,
    extractor_frozen: bool = False,
) -> dict[str, float]:
    """FLOPs of one training step on one GPU, per component and pass.

    Args:
        config: the model (SpidR heads read one layer each; the count is the same for DinoSR's heads).
        samples_per_gpu: samples in the GPU's batch (3.8 M in the paper).
        utterance_samples: length of every utterance (cropped batches have no padding).
        mask_fraction: masked fraction of the frames; default: our mask generator's on this batch.
        extractor_frozen: after ``freeze_step``: no backward (and no optimiser) for extractor and projection.

    Returns:
        ``"{component}.forward"`` and ``"{component}.backward"`` for each of :data:`COMPONENTS`; ``"optimizer"``
        (AdamW, gradient clipping and the EMA of the teacher, elementwise); ``"forward"``, ``"backward"`` (their
        sums over the components) and ``"total"`` (forward + backward + optimizer).
    """
    layout = batch_layout(config, samples_per_gpu, utterance_samples=utterance_samples, mask_fraction=mask_fraction)
    u, t, n = layout.utterances, layout.frames, layout.masked
    d, k, c = config.encoder_embed_dim, config.codebook_size, config.num_codebooks
    extractor, _ = _extractor_flops(config, utterance_samples)
    pos, layers = _encoder_flops(config, t)
    forward = {
        "extractor": u * extractor,
        "projection": u * 2 * t * config.extractor_conv_layer_config[-1][0] * d,
        "student.pos_conv": u * pos,
        "student.layers": u * layers,
        "teacher.pos_conv": u * pos,
        "teacher.layers": u * layers,
        "heads": u * c * 2 * n * d * k,  # one Linear per head on the masked frames
        # distances (||c||^2 - 2 x.c) per codebook, the codeword norms, and the segment sums of the update
        "codebooks": u * c * (2 * n * d * k + n * d) + c * 3 * k * d,
    }
    trained = {"student.pos_conv", "student.layers", "heads"}
    if not extractor_frozen:
        trained |= {"extractor", "projection"}
    flops: dict[str, float] = {}
    for name in COMPONENTS:
        flops[f"{name}.forward"] = forward[name]
        flops[f"{name}.backward"] = 2 * forward[name] if name in trained else 0.0
    flops["forward"] = sum(flops[f"{name}.forward"] for name in COMPONENTS)
    flops["backward"] = sum(flops[f"{name}.backward"] for name in COMPONENTS)
    params = parameter_counts(config)
    trainable = params["trainable"] - (params["extractor+projection"] if extractor_frozen else 0)
    # AdamW ~14 FLOPs per element, norm + scaling of the clipping 3, EMA lerp 3 per teacher parameter.
    flops["optimizer"] = 17.0 * trainable + 3.0 * params["teacher"]
    flops["total"] = flops["forward"] + flops["backward"] + flops["optimizer"]
    return flops


def average_step_flops(config: DinoSRConfig, steps: int = STEPS, **kwargs: Any) -> float:
    """FLOPs per step averaged over ``steps``: the extractor is trained until ``freeze_step``, frozen after."""
    before = count_flops(config, **kwargs)["total"]
    after = count_flops(config, extractor_frozen=True, **kwargs)["total"]
    trained_steps = min(steps, config.freeze_step)
    return (before * trained_steps + after * (steps - trained_steps)) / steps


# ----------------------------------------------------------------------------- report
def flop_table(config: DinoSRConfig, layout: Layout, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Markdown table of GFLOPs per step per component, before and after the extractor is frozen."""
    before = count_flops(config, **kwargs)
    after = count_flops(config, extractor_frozen=True, **kwargs)
    lines = [
        f"### FLOPs of one training step on one GPU: {layout.samples / 1e6:g} M samples = {layout.utterances:g} x "
        f"{layout.utterance_samples / SAMPLE_RATE:g} s, {layout.frames} frames each, {layout.mask_fraction:.3f} "
        "masked",
        "",
        "| component | forward GFLOP | backward GFLOP | total GFLOP | share | total after freeze GFLOP |",
        "|---|---|---|---|---|---|",
    ]
    for name in COMPONENTS:
        fwd, bwd = before[f"{name}.forward"], before[f"{name}.backward"]
        frozen = after[f"{name}.forward"] + after[f"{name}.backward"]
        lines.append(
            f"| {name} | {fwd / 1e9:,.1f} | {bwd / 1e9:,.1f} | {(fwd + bwd) / 1e9:,.1f} | "
            f"{(fwd + bwd) / before['total']:.1%} | {frozen / 1e9:,.1f} |"
        )
    opt, opt_after = before["optimizer"], after["optimizer"]
    lines.append(
        f"| optimizer + clip + EMA | | | {opt / 1e9:,.1f} | {opt / before['total']:.1%} | {opt_after / 1e9:,.1f} |"
    )
    lines.append(
        f"| **total** | {before['forward'] / 1e9:,.1f} | {before['backward'] / 1e9:,.1f} | "
        f"{before['total'] / 1e9:,.1f} | 100% | {after['total'] / 1e9:,.1f} |"
    )
    extractor, elements = _extractor_flops(config, layout.utterance_samples)
    lines += [
        "",
        f"Backward = 2 x forward for trained parts; `after freeze`: from step {config.freeze_step} the extractor "
        "and projection are frozen (no backward, no optimiser state). Not counted: norms, GELU, softmax, dropout "
        f"(the extractor's norm + GELU at ~{ELEMENTWISE_FLOPS} FLOP per element would be "
        f"{ELEMENTWISE_FLOPS * elements / extractor:.1%} of its convolutions; less elsewhere), and the first conv's "
        "input gradient, counted although the waveform needs none (under 1% of the extractor).",
    ]
    return "\n".join(lines) + "\n", {"before_freeze": before, "after_freeze": after}


def paper_table(config: DinoSRConfig, **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    """The step time and MFU implied by the paper's wall-clock figures (SPEC 4)."""
    flops = average_step_flops(config, **kwargs)
    lines = [
        "### What the paper's figures imply (SPEC 4: 400k steps, 16 GPUs, 3.8 M samples per GPU per step)",
        "",
        "| GPU | torch.compile | hours | s / step | model TFLOP/s per GPU | bf16 dense peak TFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for gpu, gpus, compiled, hours in PAPER:
        step_s = hours * 3600 / STEPS
        achieved = flops / step_s
        mfu = achieved / PEAK_BF16_DENSE[gpu]
        rows.append(
            {
                "gpu": gpu,
                "gpus": gpus,
                "compile": compiled,
                "hours": hours,
                "step_s": step_s,
                "tflops_per_gpu": achieved / 1e12,
                "peak_tflops": PEAK_BF16_DENSE[gpu] / 1e12,
                "mfu": mfu,
            }
        )
        lines.append(
            f"| {gpus} x {gpu} | {'yes' if compiled else 'no'} | {hours:g} | {step_s:.3f} | {achieved / 1e12:.1f} | "
            f"{PEAK_BF16_DENSE[gpu] / 1e12:g} | {mfu:.1%} |"
        )
    lines += [
        "",
        f"Model FLOPs per step averaged over the run ({flops / 1e12:.2f} TFLOP: extractor trained for "
        f"{config.freeze_step} of {STEPS} steps). Peaks: A100 (SXM) 312 and H100 SXM 989 TFLOP/s bf16 dense, "
        "without sparsity. The paper's batches are filled up to 3.8 M samples, so the real average is a little "
        "lower and the MFU a little lower than shown.",
    ]
    return "\n".join(lines) + "\n", rows


def projection(
    config: DinoSRConfig,
    step_seconds: float,
    samples: float,
    *,
    gpus: int = 16,
    peak_tflops: float | None = None,
    **kwargs: Any,
) -> tuple[str, dict[str, Any]]:
    """Hours for 400k steps at 3.8 M samples per GPU from a step of ``step_seconds`` at ``samples`` samples."""
    step_38 = step_seconds * SAMPLES_PER_GPU / samples
    hours = STEPS * step_38 / 3600
    before = count_flops(config, **kwargs)["total"]
    after = count_flops(config, extractor_frozen=True, **kwargs)["total"]
    trained = min(STEPS, config.freeze_step)
    hours_freeze = (trained * step_38 + (STEPS - trained) * step_38 * after / before) / 3600
    achieved = before / step_38
    result: dict[str, Any] = {
        "step_seconds": step_seconds,
        "measured_samples": samples,
        "step_seconds_at_3.8M": step_38,
        "gpus": gpus,
        "hours": hours,
        "gpu_hours": hours * gpus,
        "hours_with_freeze": hours_freeze,
        "model_tflops_per_gpu": achieved / 1e12,
    }
    lines = [
        f"### Projection: {STEPS} steps at {SAMPLES_PER_GPU / 1e6:g} M samples per GPU on {gpus} GPUs",
        "",
        f"- measured step: {step_seconds * 1e3:.1f} ms at {samples:,.0f} samples; scaled linearly to "
        f"{SAMPLES_PER_GPU:,} samples: {step_38:.3f} s per step ({achieved / 1e12:.1f} model TFLOP/s)",
        f"- **{hours:.1f} h** for {STEPS} steps ({hours * gpus:,.0f} GPU-hours); data parallel at the same per-GPU "
        "batch, so the hours do not depend on the number of GPUs; communication (gradient all-reduce, the "
        "codebook and perplexity all-reduces) and data loading are ignored",
        f"- {hours_freeze:.1f} h if the steps after the extractor freeze (step {config.freeze_step}) are faster in "
        f"proportion to their FLOPs ({after / before:.2f} x)",
    ]
    if gpus != 16:
        lines.append(
            f"- keeping the paper's global batch (16 x 3.8 M samples) on {gpus} GPUs instead needs {16 / gpus:g} "
            f"per-GPU steps per optimiser step (gradient accumulation): {hours * 16 / gpus:.1f} h"
        )
        result["hours_at_paper_global_batch"] = hours * 16 / gpus
    if peak_tflops:
        result["mfu"] = achieved / (peak_tflops * 1e12)
        lines.append(f"- MFU of the measured step against a {peak_tflops:g} TFLOP/s peak: {result['mfu']:.1%}")
    lines.append(
        "- linear scaling in samples is exact for the per-frame work but not for attention (quadratic in the "
        "utterance length): measure at the utterance length of the projection for a faithful figure"
    )
    return "\n".join(lines) + "\n", result


def step_from_json(path: Path, row: str = "ours") -> tuple[float, float, str]:
    """(median seconds, samples per step, title) of ``row`` in a bench_step JSON file (``--json`` of bench_step).

    Raises:
        ValueError: the file holds no such row, or the row has no ``samples/step``.
    """
    data = json.loads(Path(path).read_text())
    for suite in data.get("suites", []):
        for entry in suite.get("rows", []):
            if entry.get("name") == row:
                samples = entry.get("extra", {}).get("samples/step")
                if samples is None:
                    raise ValueError(f"{path}: row {row!r} has no samples/step")
                return float(entry["median_s"]), float(samples), suite.get("title", "")
    raise ValueError(f"{path}: no row {row!r} in its suites")


def device_peak_tflops() -> float | None:
    """bf16 dense peak of the current CUDA device when it is an A100, H100 or H200 (H200: H100's), else None."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for gpu, peak in (("A100", PEAK_BF16_DENSE["A100"]), ("H100", PEAK_BF16_DENSE["H100"]), ("H200", 989e12)):
        if gpu in name:
            return peak / 1e12
    return None


def measure_step(args: argparse.Namespace) -> tuple[float, float, str]:
    """Run bench_step's ``ours`` row at the given batch; return (median seconds, samples per step, description)."""
    from benchmarks import bench_step  # heavy: only with --measure

    suite = bench_step.run_suite(
        repeats=args.repeats,
        device=args.device,
        compile_model=args.compile,
        batch=args.batch,
        utterance_samples=args.measure_utterance_samples or args.utterance_samples,
        dtype=args.dtype,
        rows=("ours",),
    )
    row = suite.rows[0]
    print(suite.markdown())
    return row.median_s, float(row.extra["samples/step"]), suite.title


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/project_400k.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--utterance-samples",
        type=int,
        default=UTTERANCE_SAMPLES,
        help=f"length of every utterance of the 3.8 M-sample batch (default {UTTERANCE_SAMPLES} = 12.5 s)",
    )
    parser.add_argument("--step-seconds", type=float, help="a measured step time, in seconds, at --samples")
    parser.add_argument("--samples", type=float, help="samples per step of that measurement (e.g. 3800000)")
    parser.add_argument("--gpus", type=int, default=16, help="GPUs of the projected run (default 16)")
    parser.add_argument(
        "--peak-tflops",
        help="peak TFLOP/s of the measured device, for its MFU; 'auto': bf16 dense peak of this A100/H100/H200",
    )
    parser.add_argument(
        "--from-step-json", type=Path, metavar="PATH", help="take the step time from bench_step's JSON (row --row)"
    )
    parser.add_argument("--row", default="ours", help="with --from-step-json: the row to read (default ours)")
    parser.add_argument("--measure", action="store_true", help="measure the step now with bench_step (row ours)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="with --measure (default cpu)")
    parser.add_argument("--batch", type=int, help="with --measure: utterances per batch (bench_step's default 2)")
    parser.add_argument(
        "--measure-utterance-samples",
        type=int,
        help="with --measure: samples per utterance of the measured batch (default: --utterance-samples)",
    )
    parser.add_argument("--compile", action="store_true", help="with --measure: torch.compile the model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="with --measure")
    parser.add_argument("--repeats", type=int, default=5, help="with --measure: timed steps (default 5)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write everything as JSON to OUT")
    args = parser.parse_args(argv)
    if (args.step_seconds is None) != (args.samples is None):
        parser.error("--step-seconds and --samples go together")
    if sum([args.measure, args.step_seconds is not None, args.from_step_json is not None]) > 1:
        parser.error("give one of --measure, --step-seconds/--samples and --from-step-json")
    peak = None
    if args.peak_tflops == "auto":
        peak = device_peak_tflops()
    elif args.peak_tflops is not None:
        try:
            peak = float(args.peak_tflops)
        except ValueError:
            parser.error(f"--peak-tflops must be a number or 'auto', got {args.peak_tflops!r}")
    config = SpidRConfig()
    layout = batch_layout(config, utterance_samples=args.utterance_samples)
    kwargs = {"utterance_samples": args.utterance_samples, "mask_fraction": layout.mask_fraction}
    print(machine_line())
    print()
    table, flops = flop_table(config, layout, **kwargs)
    print(table)
    paper, paper_rows = paper_table(config, **kwargs)
    print(paper)
    report: dict[str, Any] = {
        "machine": machine_line(),
        "assumptions": {**asdict(layout), "steps": STEPS, "freeze_step": config.freeze_step},
        "flops": flops,
        "paper": paper_rows,
        "projection": None,
    }
    step_seconds, samples = args.step_seconds, args.samples
    if args.measure:
        step_seconds, samples, what = measure_step(args)
        report["measured"] = what
    elif args.from_step_json is not None:
        step_seconds, samples, what = step_from_json(args.from_step_json, args.row)
        report["measured"] = f"{what} (row {args.row}, from {args.from_step_json})"
        print(f"Measured step: {report['measured']}\n")
        if "base" not in what:
            print(
                "Note: the measured step is not the base model's (a --quick run?): the projection below checks "
                "the code path, it is not a figure.\n"
            )
    if step_seconds is not None and samples is not None:
        text, result = projection(config, step_seconds, samples, gpus=args.gpus, peak_tflops=peak, **kwargs)
        print(text)
        report["projection"] = result
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
