"""Generate tests/compat/fixtures/models.pt: golden outputs of the reference release's models API (spidr 0.2.0).

Run it with the release installed as ``spidr`` in its own virtual environment (it cannot share one with this
project, which has the same package name), from the repository root:

    . /work/refvenv/bin/activate   # or any venv with `pip install spidr==0.2.0`
    python tests/compat/generators/make_models.py tests/compat/fixtures/models.pt

The output is deterministic (fixed seeds, one thread) and holds plain tensors, lists, dicts, strings and numbers
only, so ``torch.load(path, weights_only=True)`` reads it. It records, for a tiny SpidR and a tiny DinoSR:

- ``config``, ``seed`` and ``state_dict``: the model built right after ``torch.manual_seed(seed)``;
- a padded batch of standardised waveforms of unequal lengths, four attention masks (``none``; ``pad``, the
  (B, 1, 1, T) padding mask; ``pad_full``, the same broadcast to (B, 1, T, T); ``band``, a banded (B, 1, T, T)
  mask on the real keys, with the diagonal kept), ``mask_indices``, and per mask the outputs of
  ``get_intermediate_outputs``, ``get_codebooks`` (probabilities and one-hot) and the eval-mode ``forward``;
- ``update_ema`` decays over a range of steps, the model's ``ema_scheduler`` and ``teacher_exclude_layers``;

and, for the whole module: ``get_components`` state-dict layouts; components built with the release's
constructors, their seeded state dicts and outputs; ``Codebook``/``Codebooks`` one-hots and updates; the two EMA
schedulers over a grid; and the metrics functions on seeded inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import components, metrics
from spidr.models.dinosr import DinoSR, ema_scheduler
from spidr.models.spidr import SpidR, exp_ema_scheduler

SMALL = {
    "extractor_conv_layer_config": [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2,
    "encoder_embed_dim": 32,
    "encoder_num_layers": 3,
    "encoder_num_heads": 4,
    "encoder_ff_interm_features": 64,
    "encoder_pos_conv_groups": 4,
    "encoder_attention_dropout": 0.0,
    "encoder_dropout": 0.0,
    "encoder_layer_drop": 0.0,
    "codebook_size": 12,
    "num_codebooks": 2,
}
MODELS = {  # name: (model class, config class, config fields changed from SMALL, seed)
    "spidr": (SpidR, SpidRConfig, {"encoder_pos_conv_kernel": 12, "encoder_pos_conv_depth": 2}, 11),  # even kernel
    "dinosr": (  # narrower (the fixture stays under 1 MB)
        DinoSR,
        DinoSRConfig,
        {
            "encoder_embed_dim": 16,
            "encoder_num_heads": 2,
            "encoder_ff_interm_features": 48,
            "encoder_pos_conv_kernel": 15,
            "encoder_pos_conv_depth": 5,
        },
        12,
    ),
}
LENGTHS = [4800, 3840, 2880]  # 14, 11 and 8 frames
NUM_MASKED = 6
EMA_STEPS = [0, 1, 10, 999, 5_000, 29_999, 30_000, 100_000, 199_999, 200_000, 250_000, 400_000]
TEACHER_KEYS = [  # teacher tensors recorded after update_ema: copied (pos_conv_embed) and averaged ones
    "pos_conv_embed.convs.0.bias",
    "pos_conv_embed.convs.1.weight",
    "layer_norm.weight",
    "layers.0.attention.proj.weight",
    "layers.2.final_layer_norm.bias",
]


def plain_config(cfg: DinoSRConfig) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def layout(module: nn.Module) -> list[list]:
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def waveforms(generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    batch = torch.zeros(len(LENGTHS), max(LENGTHS))
    for row, n in enumerate(LENGTHS):
        batch[row, :n] = F.layer_norm(torch.randn(n, generator=generator), (n,))
    return batch, LENGTHS


def attention_masks(frames: list[int], total: int) -> dict[str, torch.Tensor]:
    keep = torch.arange(total) < torch.tensor(frames).unsqueeze(1)  # (B, T)
    pad = keep[:, None, None, :]
    positions = torch.arange(total)
    band = (positions[:, None] - positions[None, :]).abs() <= 3
    banded = (band[None] & keep[:, None, :]) | torch.eye(total, dtype=torch.bool)[None]
    return {"pad": pad.clone(), "pad_full": pad.expand(-1, 1, total, total).clone(), "band": banded[:, None].clone()}


def inputs_entry() -> dict:
    """The inputs every model sees: the padded batch, its frame counts, the masks and the masked positions."""
    generator = torch.Generator().manual_seed(100)
    wavs, lengths = waveforms(generator)
    extractor = SpidR(SpidRConfig(**SMALL)).feature_extractor
    with torch.no_grad():
        total = extractor(wavs[:1]).shape[1]
        frames = [extractor(wavs[i : i + 1, :n]).shape[1] for i, n in enumerate(lengths)]
    mask_indices = torch.stack(
        [torch.randperm(min(frames), generator=generator)[:NUM_MASKED].sort().values for _ in lengths]
    )
    masks = attention_masks(frames, total)
    return {"wavs": wavs, "lengths": lengths, "frames": frames, "masks": masks, "mask_indices": mask_indices}


def model_entry(name: str, inputs: dict) -> dict:
    model_class, config_class, extra, seed = MODELS[name]
    cfg = config_class(**(SMALL | extra))
    torch.manual_seed(seed)
    model = model_class(cfg)
    entry: dict = {"model_type": name, "config": plain_config(cfg), "seed": seed}
    entry["state_dict"] = {k: v.clone() for k, v in model.state_dict().items()}
    entry["teacher_exclude_layers"] = sorted(model.teacher_exclude_layers)
    entry["student_layer_norm_first"] = model.student.layer_norm_first
    model.eval()
    wavs, masks, mask_indices = inputs["wavs"], inputs["masks"], inputs["mask_indices"]

    outputs = {}
    with torch.no_grad():
        for mask_name in ["none", *masks]:
            mask = None if mask_name == "none" else masks[mask_name]
            codebooks = model.get_codebooks(wavs, attention_mask=mask)
            onehot = model.get_codebooks(wavs, attention_mask=mask, onehot=True)
            loss, ppl = model(wavs, mask_indices=mask_indices, attention_mask=mask)
            outputs[mask_name] = {
                "intermediate": model.get_intermediate_outputs(wavs, attention_mask=mask),
                "num_none": sum(c is None for c in codebooks),
                "codebooks": [c for c in codebooks if c is not None],
                "onehot": [c.to(torch.uint8) for c in onehot if c is not None],  # int64 in the release
                "onehot_dtype": str(next(c for c in onehot if c is not None).dtype),
                "loss": loss,
                "target_ppl": ppl["target_ppl"],
                "pred_ppl": ppl["pred_ppl"],
            }
        loss, ppl = model(wavs)  # every frame a prediction position, nothing masked
        outputs["none"] |= {"loss_all": loss, "target_ppl_all": ppl["target_ppl"], "pred_ppl_all": ppl["pred_ppl"]}
        encoder = model.student.get_intermediate_outputs(
            model.feature_projection(model.feature_extractor(wavs)), masks["band"], 2, before_residual=False
        )
        outputs["band"]["student_after_residual_2"] = encoder
    entry["outputs"] = outputs

    entry["ema_steps"] = EMA_STEPS
    entry["ema_scheduler"] = [float(model.ema_scheduler(step)) for step in EMA_STEPS]
    torch.manual_seed(seed)
    trained = model_class(cfg).train()
    with torch.no_grad():  # move the student away from the teacher so that the EMA has something to do
        for p in trained.student.parameters():
            p.add_(0.01)
    entry["update_ema"] = [float(trained.update_ema(step)) for step in EMA_STEPS[:3]]
    entry["teacher_after_ema"] = {k: trained.teacher.state_dict()[k].clone() for k in TEACHER_KEYS}
    entry["current_step_after_ema"] = trained.current_step.clone()
    return entry


def components_entry() -> dict:
    cfg = SpidRConfig(**SMALL, encoder_pos_conv_kernel=12, encoder_pos_conv_depth=2)
    entry: dict = {"config": plain_config(cfg)}
    parts = components.get_components(cfg)
    entry["get_components_layout"] = [layout(part) for part in parts]
    entry["get_components_types"] = [type(part).__name__ for part in parts]

    torch.manual_seed(3)
    blocks = nn.ModuleList(
        [
            components.ConvLayerBlock(1, 8, 10, 5, components.LayerNorm(8, elementwise_affine=True), bias=False),
            components.ConvLayerBlock(8, 8, 3, 2, nn.GroupNorm(8, 8, affine=True), bias=True),
            components.ConvLayerBlock(8, 8, 2, 2, None, bias=False),
        ]
    )
    extractor = components.FeatureExtractor(blocks)
    projection = components.FeatureProjection(8, 16)
    pos_conv = components.ConvPositionalEmbedding(16, kernel_size=8, groups=2, depth=2)
    layers = nn.ModuleList(
        [
            components.TransformerLayer(
                components.SelfAttention(16, 2, qkv_bias=True),
                0.0,
                components.FeedForward(16, 24, 0.0),
                layer_norm_first=first,
            )
            for first in (False, True)
        ]
    )
    transformer = components.Transformer(layers, pos_conv, 0.0, 0.0, layer_norm_first=True)
    pre_ln = components.Transformer(
        nn.ModuleList(
            [
                components.TransformerLayer(
                    components.SelfAttention(16, 4, qkv_bias=False, dropout=0.0),
                    0.0,
                    components.FeedForward(16, 24, 0.0),
                    layer_norm_first=True,
                )
            ]
        ),
        components.ConvPositionalEmbedding(16, 9, 4, 3),
        0.0,
        0.0,
        layer_norm_first=False,
    )
    modules = {"extractor": extractor, "projection": projection, "transformer": transformer, "pre_ln": pre_ln}
    entry["state_dicts"] = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in modules.items()}
    entry["attributes"] = {
        "pos_conv": [pos_conv.layer_kernel_size, pos_conv.num_remove, pos_conv.kernel_size, pos_conv.groups],
        "block_kernel_stride": [[b.kernel_size, b.stride] for b in blocks],
    }

    generator = torch.Generator().manual_seed(4)
    wavs = torch.randn(2, 800, generator=generator)  # 39 frames
    index = torch.tensor([[0, 3, 5], [1, 2, 7]])
    with torch.no_grad():
        feats = extractor(wavs)
        x = projection(feats)
        frames = x.shape[1]
        keep = torch.arange(frames) < torch.tensor([[frames], [frames - 3]])
        full = keep[:, None, None, :].expand(-1, 1, frames, frames) | torch.eye(frames, dtype=torch.bool)
        out = {
            "wavs": wavs,
            "feats": feats,
            "projected": x,
            "pos_conv_pad": pos_conv(x, keep[:, None, None, :]),
            "pos_conv_full": pos_conv(x, full),
            "transformer": transformer(x),
            "transformer_full": transformer(x, full),
            "intermediate_full": transformer.get_intermediate_outputs(x, full),
            "intermediate_after": transformer.get_intermediate_outputs(x, None, 1, before_residual=False),
            "pre_ln": pre_ln(x, keep[:, None, None, :]),
            "index": index,
            "mask_from_index": components.mask_from_index(index, frames),
            "select_masked": components.select_masked(x, index),
        }
    entry["outputs"] = out

    # Codebook and Codebooks, the release's one-hot API
    torch.manual_seed(5)
    books = components.Codebooks(components.Codebook(16, 6, 0.9) for _ in range(2))
    targets = [torch.randn(20, 16, generator=generator) for _ in range(2)]
    entry["codebooks_before"] = {k: v.clone() for k, v in books.state_dict().items()}
    entry["codebooks_targets"] = targets
    entry["codebook_forward"] = books[0](targets[0])
    count = torch.tensor([3.0, 0.0, 1.0, 0.0, 5.0, 2.0])
    memory = torch.randn(6, 16, generator=generator)
    single = components.Codebook(16, 6, 0.8)
    single.load_state_dict(books[1].state_dict())
    single.update(count, memory)
    entry["codebook_update"] = {
        "count": count,
        "memory": memory,
        "after": {k: v.clone() for k, v in single.state_dict().items()},
    }
    books.eval()
    entry["quantize_eval"] = books.quantize(targets)
    entry["codebooks_after_eval"] = {k: v.clone() for k, v in books.state_dict().items()}
    books.train()
    entry["quantize_train"] = books.quantize(targets)
    entry["codebooks_after_train"] = {k: v.clone() for k, v in books.state_dict().items()}
    return entry


def schedulers_entry() -> dict:
    linear_args = [(0.999, 0.9999, 30_000, 200_000), (0.99, 0.999, 10, 25), (0.5, 0.9, 100, 100)]
    exp_args = [(0.999, 20_000, 1e-7), (0.9, 10.0, 1e-3), (0.99, 1.0, 0.0)]
    steps = [0, 1, 5, 9, 10, 24, 25, 99, 100, 101, 1_000, 29_999, 30_000, 199_999, 200_000, 400_000]
    return {
        "steps": steps,
        "linear_args": [list(a) for a in linear_args],
        "linear": [[float(ema_scheduler(s, *a)) for s in steps] for a in linear_args],
        "exp_args": [list(a) for a in exp_args],
        "exp": [[float(exp_ema_scheduler(s, *a)) for s in steps] for a in exp_args],
    }


def metrics_entry() -> dict:
    generator = torch.Generator().manual_seed(6)
    ys = [torch.softmax(torch.randn(30, 7, generator=generator) * s, dim=-1) for s in (0.5, 2.0, 8.0)]
    ys.append(F.one_hot(torch.randint(0, 7, (30,), generator=generator), 7).float())
    params = [torch.randn(5, 3, generator=generator), torch.randn(4, generator=generator)]
    entry: dict = {
        "ys": ys,
        "perplexities": metrics.perplexities(ys),
        "params": params,
        "params_norm": {str(p): metrics.params_norm(params, p) for p in (2.0, 1.0, float("inf"))},
        "params_norm_single": metrics.params_norm(params[0]),
    }
    rng = random.Random(7)
    inventory = ["sil", "a", "b", "k", "i", "u", "s", "t"]
    weights = [30, 12, 9, 7, 5, 4, 2, 1]  # distinct frequencies: the rows' order is unambiguous
    data: dict[str, tuple[list[str], list[int]]] = {}
    for i in range(6):
        length = rng.randint(8, 25)
        units = [rng.randrange(10) for _ in range(length)]
        phones = rng.choices(inventory, weights=weights, k=2 * length + rng.choice([-2, -1, 0, 1, 2]))
        data[f"utt{i}"] = (phones, units)
    entry["data"] = data
    count, phone_order = metrics.build_count_matrix(data, 10, 8, 2)
    entry["build_count_matrix"] = {"count": count, "phone_order": phone_order}
    entry["units_quality"] = list(metrics.units_quality(data, num_units=10, num_phones=8))
    entry["units_quality_40ms"] = list(
        metrics.units_quality(data, num_units=10, num_phones=8, frame_step=40, alignment_step=20)
    )
    entry["bitrate"] = {
        "sequences": metrics.bitrate(num_units=10, sequences=[u for _, u in data.values()]),
        "sequences_40ms": metrics.bitrate(num_units=10, sequences=[u for _, u in data.values()], frame_step=40),
        "none": metrics.bitrate(num_units=256),
        "none_40ms": metrics.bitrate(num_units=100, frame_step=40),
    }
    for only_active in (False, True):
        proba, order, codes = metrics.proba_phone_code(data, num_units=10, num_phones=8, only_active=only_active)
        entry[f"proba_phone_code_{only_active}"] = {"proba": proba, "phone_order": order, "codes": codes}
    return entry


def main(path: str) -> None:
    version = importlib.metadata.version("spidr")
    if version != "0.2.0" or Path(components.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[3]):
        sys.exit(f"run this with the reference release spidr 0.2.0 installed, not this repository (found {version})")
    torch.set_num_threads(1)
    inputs = inputs_entry()
    fixture = {
        "spidr_version": "0.2.0",
        "torch_version": str(torch.__version__),
        "inputs": inputs,
        "models": {name: model_entry(name, inputs) for name in MODELS},
        "components": components_entry(),
        "schedulers": schedulers_entry(),
        "metrics": metrics_entry(),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, path)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/compat/fixtures/models.pt")
