"""Extract the layer outputs of a SpidR or DinoSR model from one WAV file (a quick-start example).

    python examples/extract_layers.py speech.wav --model spidr_base --layers 6 --output feats.pt

Reads a 16 kHz mono 16-bit WAV with the standard library, standardises it as the models expect
(zero mean, unit variance over the utterance), and saves ``{layer: (frames, dim) tensor}``; layers
are numbered from 1. ``--no-pretrained`` uses fresh weights (no download), to try the pipeline offline.
"""

from __future__ import annotations

import argparse
import sys
import wave
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from spidr.models import dinosr_base_original, dinosr_base_reproduced, spidr_base

MODELS = {
    "spidr_base": spidr_base,
    "dinosr_base_reproduced": dinosr_base_reproduced,
    "dinosr_base_original": dinosr_base_original,
}


def read_wav(path: Path) -> torch.Tensor:
    with wave.open(str(path), "rb") as f:
        if f.getframerate() != 16000 or f.getnchannels() != 1 or f.getsampwidth() != 2:
            sys.exit(
                f"{path}: expected 16 kHz mono 16-bit PCM, got {f.getframerate()} Hz, "
                f"{f.getnchannels()} channel(s), {8 * f.getsampwidth()}-bit"
            )
        samples = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return torch.from_numpy(samples.astype(np.float32) / 32768.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav", type=Path, help="16 kHz mono 16-bit WAV file")
    parser.add_argument("--model", choices=sorted(MODELS), default="spidr_base", help="published model")
    parser.add_argument("--checkpoint", type=Path, help="local checkpoint file instead of the download")
    parser.add_argument("--no-pretrained", action="store_true", help="fresh weights, no download")
    parser.add_argument("--layers", default="6", help="comma-separated layers, numbered from 1 (default: 6)")
    parser.add_argument(
        "--output", type=Path, default=Path("features.pt"), help="where to save (default: features.pt)"
    )
    args = parser.parse_args()

    model = MODELS[args.model](pretrained=not args.no_pretrained, checkpoint=args.checkpoint)
    num_layers = len(model.student.layers)
    layers = [int(x) for x in args.layers.split(",")]
    if any(not 1 <= layer <= num_layers for layer in layers):
        sys.exit(f"--layers must be in 1..{num_layers}, got {args.layers}")
    waveform = read_wav(args.wav)
    waveform = F.layer_norm(waveform, waveform.shape, eps=1e-5)  # the model expects standardised input
    with torch.inference_mode():
        outputs = model.get_intermediate_outputs(waveform.unsqueeze(0))
    features = {layer: outputs[layer - 1][0].clone() for layer in layers}
    torch.save(features, args.output)
    for layer, feats in features.items():
        print(f"layer {layer}: {tuple(feats.shape)} (frames, dim), mean {feats.mean():+.4f}, std {feats.std():.4f}")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
