"""Code written against the reference release's models API (spidr 0.2.0) runs unchanged and gives its outputs.

Golden values come from the release itself: tests/compat/generators/make_models.py wrote
tests/compat/fixtures/models.pt with spidr 0.2.0 installed (see its docstring). Tolerances: 1e-5 absolute on
activations and losses (float32 on the CPU; the release meets it run to run), exact where the values are
integers, labels, layouts or schedules.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import spidr.models.pretrained as pretrained
import spidr.ops
from spidr.config import DinoSRConfig, SpidRConfig
from spidr.models import CheckpointError, DinoSR, SpidR
from spidr.models import components as C
from spidr.models import metrics as M
from spidr.models.dinosr import dinosr_ema_decay, ema_scheduler, init_teacher
from spidr.models.spidr import exp_ema_scheduler, spidr_ema_decay
from spidr.models.utils import build_model, model_from_raw_checkpoint, spidr_base

FIXTURE = Path(__file__).parent / "fixtures" / "models.pt"
ATOL = 1e-5

# Every public name of the release's models modules (spidr 0.2.0), imported ones included.
RELEASE_NAMES = {
    "spidr.models": ["DinoSR", "SpidR", "build_model", "dinosr_base_original", "dinosr_base_reproduced", "spidr_base"],
    "spidr.models.components": [
        "Codebook",
        "Codebooks",
        "ConvLayerBlock",
        "ConvPositionalEmbedding",
        "DinoSRConfig",
        "FeatureExtractor",
        "FeatureProjection",
        "FeedForward",
        "LayerNorm",
        "SelfAttention",
        "Transformer",
        "TransformerLayer",
        "get_components",
        "mask_from_index",
        "select_masked",
    ],
    "spidr.models.dinosr": [
        "DinoSR",
        "DinoSRConfig",
        "EmaTargets",
        "Transformer",
        "ema_scheduler",
        "get_components",
        "init_teacher",
        "mask_from_index",
        "perplexities",
        "select_masked",
    ],
    "spidr.models.spidr": ["DinoSR", "SpidR", "SpidRConfig", "exp_ema_scheduler", "mask_from_index", "perplexities"],
    "spidr.models.metrics": [
        "NonFiniteError",
        "PhonesAndUnits",
        "UnitsQuality",
        "bitrate",
        "build_count_matrix",
        "params_norm",
        "perplexities",
        "proba_phone_code",
        "units_quality",
    ],
    "spidr.models.utils": [
        "DinoSR",
        "DinoSRConfig",
        "ModelType",
        "SpidR",
        "SpidRConfig",
        "build_model",
        "dinosr_base_original",
        "dinosr_base_reproduced",
        "model_from_raw_checkpoint",
        "spidr_base",
        "state_dict_from_dinosr_fairseq_checkpoint",
    ],
}
MASKS = ["none", "pad", "pad_full", "band"]


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(params=spidr.ops.backends("cpu"))
def backend(request):
    """Each CPU backend of the codebook and loss ops in turn."""
    with spidr.ops.use_backend(request.param):
        yield request.param


def config_of(entry: dict) -> DinoSRConfig:
    return (SpidRConfig if entry["model_type"] == "spidr" else DinoSRConfig)(**entry["config"])


def model_of(entry: dict) -> DinoSR:
    model = (SpidR if entry["model_type"] == "spidr" else DinoSR)(config_of(entry))
    model.load_state_dict(entry["state_dict"])
    return model.eval()


def close(actual, expected, atol: float = ATOL) -> None:
    if isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            close(a, e, atol)
        return
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def equal_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# --------------------------------------------------------------------------- names and construction
@pytest.mark.parametrize("module", list(RELEASE_NAMES))
def test_every_public_name_of_the_release_imports(module):
    imported = importlib.import_module(module)
    missing = [name for name in RELEASE_NAMES[module] if not hasattr(imported, name)]
    assert missing == []


def test_utils_and_components_are_this_librarys_own():
    assert build_model is pretrained.build_model and spidr_base is pretrained.spidr_base
    assert C.ConvLayerBlock is C.ConvBlock and C.LayerNorm is C.ChannelLayerNorm
    assert C.Codebooks.__module__ == "spidr.models.codebooks"


@pytest.mark.parametrize("name", ["spidr", "dinosr"])
def test_seeded_construction_draws_the_releases_weights(golden, name):
    entry = golden["models"][name]
    torch.manual_seed(entry["seed"])
    model = (SpidR if name == "spidr" else DinoSR)(config_of(entry))
    equal_state(model.state_dict(), entry["state_dict"])
    assert sorted(model.teacher_exclude_layers) == entry["teacher_exclude_layers"]
    assert model.student.layer_norm_first == entry["student_layer_norm_first"]


# --------------------------------------------------------------------------- model outputs and masks
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("name", ["spidr", "dinosr"])
def test_model_outputs_match_the_release(golden, name, mask_name, backend):
    entry, inputs = golden["models"][name], golden["inputs"]
    expected = entry["outputs"][mask_name]
    model = model_of(entry)
    wavs, mask = inputs["wavs"], None if mask_name == "none" else inputs["masks"][mask_name]
    with torch.no_grad():
        close(model.get_intermediate_outputs(wavs, attention_mask=mask), expected["intermediate"])
        codebooks = model.get_codebooks(wavs, attention_mask=mask)
        onehot = model.get_codebooks(waveform=wavs, attention_mask=mask, onehot=True)
        loss, ppl = model(wavs, mask_indices=inputs["mask_indices"], attention_mask=mask)
    assert codebooks[: expected["num_none"]] == [None] * expected["num_none"]
    close(codebooks[expected["num_none"] :], expected["codebooks"])
    assert all(str(c.dtype) == expected["onehot_dtype"] for c in onehot[expected["num_none"] :])
    assert all(
        torch.equal(a, e.long()) for a, e in zip(onehot[expected["num_none"] :], expected["onehot"], strict=True)
    )
    close(loss, expected["loss"])
    close(ppl["target_ppl"], expected["target_ppl"])
    close(ppl["pred_ppl"], expected["pred_ppl"])
    if mask_name == "none":
        with torch.no_grad():
            loss, ppl = model(wavs)
        close(loss, expected["loss_all"])
        close(ppl["target_ppl"], expected["target_ppl_all"])
        close(ppl["pred_ppl"], expected["pred_ppl_all"])
    if mask_name == "band":
        with torch.no_grad():
            x = model.feature_projection(model.feature_extractor(wavs))
            outputs = model.student.get_intermediate_outputs(x, mask, 2, before_residual=False)
        close(outputs, expected["student_after_residual_2"])


def test_full_padding_mask_equals_the_padding_mask(golden):
    """(B, 1, T, T) broadcast of the padding mask: same as the (B, 1, 1, T) mask (row 0 keeps the real frames)."""
    model, inputs = model_of(golden["models"]["spidr"]), golden["inputs"]
    with torch.no_grad():
        pad = model.get_intermediate_outputs(inputs["wavs"], attention_mask=inputs["masks"]["pad"])
        full = model.get_intermediate_outputs(inputs["wavs"], attention_mask=inputs["masks"]["pad_full"])
    close(full, pad)


# --------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("name", ["spidr", "dinosr"])
def test_ema_schedule_and_update(golden, name):
    entry = golden["models"][name]
    cfg = config_of(entry)
    model_class = SpidR if name == "spidr" else DinoSR
    model = model_of(entry)
    assert [model.ema_scheduler(step) for step in entry["ema_steps"]] == entry["ema_scheduler"]
    decay = spidr_ema_decay if name == "spidr" else dinosr_ema_decay
    assert [decay(step, cfg) for step in entry["ema_steps"]] == entry["ema_scheduler"]
    assert model.freeze_step == cfg.freeze_step and model.num_codebooks == cfg.num_codebooks

    torch.manual_seed(entry["seed"])
    trained = model_class(cfg)
    assert trained.train() is trained and trained.training and not trained.teacher.training
    with torch.no_grad():
        for p in trained.student.parameters():
            p.add_(0.01)
    assert [trained.update_ema(step) for step in entry["ema_steps"][:3]] == entry["update_ema"]
    teacher = trained.teacher.state_dict()
    for key, value in entry["teacher_after_ema"].items():
        close(teacher[key], value, 1e-7)
    assert torch.equal(trained.current_step, entry["current_step_after_ema"])


def test_update_ema_follows_a_replaced_schedule_and_exclusions():
    cfg = SpidRConfig(
        extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)],
        encoder_embed_dim=16,
        encoder_num_layers=2,
        encoder_num_heads=2,
        encoder_ff_interm_features=16,
        encoder_pos_conv_groups=2,
        codebook_size=4,
        num_codebooks=1,
    )
    model = SpidR(cfg)
    model.ema_scheduler = lambda step: 0.5  # a user's own schedule, as the release allows
    model.teacher_exclude_layers = {"layer_norm.weight"}  # copied instead of averaged
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.student.state_dict()
    assert model.update_ema(3) == 0.5
    after = model.teacher.state_dict()
    assert torch.equal(after["layer_norm.weight"], student["layer_norm.weight"])
    key = "layers.0.attention.qkv.weight"
    torch.testing.assert_close(after[key], torch.lerp(before[key], student[key], 0.5))
    teacher, excluded = init_teacher(model.student, ["pos_conv_embed", "layers.1"], init_weights=False)
    assert torch.equal(teacher.state_dict()[key], student[key]) and not teacher.training
    assert excluded == {n for n, _ in teacher.named_parameters() if n.startswith(("pos_conv_embed", "layers.1"))}


def test_schedulers_match_the_release(golden):
    entry = golden["schedulers"]
    for args, values in zip(entry["linear_args"], entry["linear"], strict=True):
        assert [ema_scheduler(step, *args) for step in entry["steps"]] == values
    for args, values in zip(entry["exp_args"], entry["exp"], strict=True):
        assert [exp_ema_scheduler(step, *args) for step in entry["steps"]] == values


# --------------------------------------------------------------------------- components
def test_get_components_layout(golden):
    entry = golden["components"]
    parts = C.get_components(SpidRConfig(**entry["config"]))
    assert [type(part).__name__ for part in parts] == entry["get_components_types"]
    assert [[[k, list(v.shape)] for k, v in part.state_dict().items()] for part in parts] == entry[
        "get_components_layout"
    ]
    assert isinstance(parts[4], C.Codebooks) and all(isinstance(c, C.Codebook) for c in parts[4])


def release_components() -> dict[str, nn.Module]:
    """The components exactly as the generator builds them with the release's constructors."""
    torch.manual_seed(3)
    blocks = nn.ModuleList(
        [
            C.ConvLayerBlock(1, 8, 10, 5, C.LayerNorm(8, elementwise_affine=True), bias=False),
            C.ConvLayerBlock(8, 8, 3, 2, nn.GroupNorm(8, 8, affine=True), bias=True),
            C.ConvLayerBlock(8, 8, 2, 2, None, bias=False),
        ]
    )
    extractor = C.FeatureExtractor(blocks)
    projection = C.FeatureProjection(8, 16)
    pos_conv = C.ConvPositionalEmbedding(16, kernel_size=8, groups=2, depth=2)
    layers = nn.ModuleList(
        [
            C.TransformerLayer(
                C.SelfAttention(16, 2, qkv_bias=True), 0.0, C.FeedForward(16, 24, 0.0), layer_norm_first=first
            )
            for first in (False, True)
        ]
    )
    transformer = C.Transformer(layers, pos_conv, 0.0, 0.0, layer_norm_first=True)
    pre_ln = C.Transformer(
        nn.ModuleList(
            [
                C.TransformerLayer(
                    C.SelfAttention(16, 4, qkv_bias=False, dropout=0.0),
                    0.0,
                    C.FeedForward(16, 24, 0.0),
                    layer_norm_first=True,
                )
            ]
        ),
        C.ConvPositionalEmbedding(16, 9, 4, 3),
        0.0,
        0.0,
        layer_norm_first=False,
    )
    return {"extractor": extractor, "projection": projection, "transformer": transformer, "pre_ln": pre_ln}


def test_release_constructors_give_the_releases_modules_and_outputs(golden):
    entry = golden["components"]
    modules = release_components()
    for name, module in modules.items():
        equal_state(module.state_dict(), entry["state_dicts"][name])
    pos_conv = modules["transformer"].pos_conv_embed
    attributes = [pos_conv.layer_kernel_size, pos_conv.num_remove, pos_conv.kernel_size, pos_conv.groups]
    assert attributes == entry["attributes"]["pos_conv"]
    blocks = modules["extractor"].conv_layers
    assert [[b.kernel_size, b.stride] for b in blocks] == entry["attributes"]["block_kernel_stride"]

    out = entry["outputs"]
    extractor, projection, transformer = modules["extractor"], modules["projection"], modules["transformer"]
    with torch.no_grad():
        feats = extractor(out["wavs"])
        x = projection(feats)
        frames = x.shape[1]
        keep = torch.arange(frames) < torch.tensor([[frames], [frames - 3]])
        full = keep[:, None, None, :].expand(-1, 1, frames, frames) | torch.eye(frames, dtype=torch.bool)
        close(feats, out["feats"])
        close(x, out["projected"])
        close(pos_conv(x, keep[:, None, None, :]), out["pos_conv_pad"])
        close(pos_conv(x, full), out["pos_conv_full"])
        close(transformer(x), out["transformer"])
        close(transformer(x, full), out["transformer_full"])
        close(transformer.get_intermediate_outputs(x, full), out["intermediate_full"])
        close(transformer.get_intermediate_outputs(x, None, 1, before_residual=False), out["intermediate_after"])
        close(modules["pre_ln"](x, keep[:, None, None, :]), out["pre_ln"])
    assert torch.equal(C.mask_from_index(out["index"], frames), out["mask_from_index"])
    close(C.select_masked(out["projected"], out["index"]), out["select_masked"], 0)


def test_config_form_builds_the_same_modules_as_the_release_form():
    cfg = DinoSRConfig(
        extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)],
        encoder_embed_dim=16,
        encoder_num_layers=2,
        encoder_num_heads=2,
        encoder_ff_interm_features=24,
        encoder_pos_conv_groups=2,
        encoder_layer_norm_first=True,
        num_codebooks=2,
    )
    torch.manual_seed(0)
    ours = C.Transformer(cfg)
    torch.manual_seed(0)
    pos = C.ConvPositionalEmbedding(16, cfg.encoder_pos_conv_kernel, 2, cfg.encoder_pos_conv_depth)
    layers = nn.ModuleList(C.TransformerLayer(cfg) for _ in range(2))
    release = C.Transformer(layers, pos, cfg.encoder_dropout, cfg.encoder_layer_drop, layer_norm_first=False)
    equal_state(ours.state_dict(), release.state_dict())
    assert ours.layer_norm_first is False and all(layer.layer_norm_first for layer in ours.layers)
    assert [k for k in C.FeatureExtractor(cfg).state_dict()] == [
        "conv_layers.0.layer_norm.weight",
        "conv_layers.0.layer_norm.bias",
        "conv_layers.0.conv.weight",
        "conv_layers.1.layer_norm.weight",
        "conv_layers.1.layer_norm.bias",
        "conv_layers.1.conv.weight",
    ]
    with pytest.raises(TypeError, match="takes no"):
        C.Transformer(cfg, pos)
    with pytest.raises(TypeError, match="needs all five"):
        C.Transformer(layers, pos, 0.0)
    with pytest.raises(TypeError, match="needs all four"):
        C.TransformerLayer(C.SelfAttention(16, 2, qkv_bias=False), 0.0)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        C.SelfAttention(16, 3, qkv_bias=False)


# --------------------------------------------------------------------------- codebooks
def test_codebook_api_of_the_release(golden):
    entry = golden["components"]
    books = C.Codebooks(C.Codebook(16, 6, 0.9) for _ in range(2))
    books.load_state_dict(entry["codebooks_before"])
    targets = entry["codebooks_targets"]
    assert torch.equal(books[0](targets[0]), entry["codebook_forward"])

    single = C.Codebook(16, 6, 0.8)
    single.load_state_dict({k.removeprefix("1."): v for k, v in entry["codebooks_before"].items() if k[0] == "1"})
    update = entry["codebook_update"]
    memory = update["memory"].clone()
    single.update(update["count"], memory)
    assert torch.equal(memory, update["memory"])  # the input is left as it was
    for key, value in update["after"].items():
        close(single.state_dict()[key], value, 1e-6)

    books.eval()
    onehots = books.quantize(targets)
    assert isinstance(onehots, list) and [o.dtype for o in onehots] == [torch.float32] * 2
    assert all(torch.equal(a, e) for a, e in zip(onehots, entry["quantize_eval"], strict=True))
    equal_state(books.state_dict(), entry["codebooks_after_eval"])
    books.train()
    onehots = books.quantize(targets)
    assert all(torch.equal(a, e) for a, e in zip(onehots, entry["quantize_train"], strict=True))
    for key, value in entry["codebooks_after_train"].items():
        close(books.state_dict()[key], value, 1e-5)
    labels = books.eval().quantize(torch.stack(targets))  # this library's form: stacked targets, labels
    assert labels.dtype == torch.int64 and labels.shape == (2, 20)
    with pytest.raises(ValueError, match="one per codebook"):
        books.quantize(targets[:1])
    with pytest.raises(ValueError, match=r"target must have shape \(N, 16\)"):
        books[0](targets[0][:, :3])
    with pytest.raises(ValueError, match=r"memory must have shape \(6, 16\)"):
        single.update(update["count"], memory[:2])


# --------------------------------------------------------------------------- metrics
def test_metrics_match_the_release(golden):
    entry = golden["metrics"]
    close(M.perplexities(entry["ys"]), entry["perplexities"], 1e-5)
    for norm_type, value in entry["params_norm"].items():
        close(M.params_norm(entry["params"], float(norm_type)), value, 1e-6)
    close(M.params_norm(entry["params"][0]), entry["params_norm_single"], 1e-6)
    with pytest.raises(M.NonFiniteError):
        M.params_norm([torch.tensor([1.0, math.inf])], error_if_nonfinite=True)

    data = entry["data"]
    count, order = M.build_count_matrix(data, 10, 8, 2)
    assert count.dtype == torch.int64 and torch.equal(count, entry["build_count_matrix"]["count"])
    assert order == entry["build_count_matrix"]["phone_order"]
    quality = M.units_quality(data, num_units=10, num_phones=8)
    assert isinstance(quality, M.UnitsQuality) and isinstance(quality, tuple)
    assert quality.active_codewords == entry["units_quality"][4]
    assert list(quality) == pytest.approx(entry["units_quality"], rel=1e-6, abs=1e-6)
    slower = M.units_quality(data, num_units=10, num_phones=8, frame_step=40, alignment_step=20)
    assert list(slower) == pytest.approx(entry["units_quality_40ms"], rel=1e-6, abs=1e-6)
    sequences = [units for _, units in data.values()]
    rates = entry["bitrate"]
    assert M.bitrate(num_units=10, sequences=sequences) == pytest.approx(rates["sequences"], rel=1e-12)
    assert M.bitrate(num_units=10, sequences=sequences, frame_step=40) == pytest.approx(rates["sequences_40ms"])
    assert M.bitrate(num_units=256) == rates["none"] and M.bitrate(num_units=100, frame_step=40) == rates["none_40ms"]
    for only_active in (False, True):
        expected = entry[f"proba_phone_code_{only_active}"]
        proba, phones, codes = M.proba_phone_code(data, num_units=10, num_phones=8, only_active=only_active)
        close(proba, expected["proba"], 1e-7)
        assert phones == expected["phone_order"] and torch.equal(codes, expected["codes"])


def test_metrics_share_the_evaluation_maths(golden):
    """units_quality of spidr.models.metrics and of spidr.evaluate agree on the same data (one implementation)."""
    from spidr.evaluate import units_quality

    data = golden["metrics"]["data"]
    _, phones = M.build_count_matrix(data, 10, 8, 2)
    index = {p: i for i, p in enumerate(phones)}
    ours = units_quality(
        {name: ([index[p] for p in labels], units) for name, (labels, units) in data.items()},
        num_units=10,
        num_phones=8,
    )
    release = M.units_quality(data, num_units=10, num_phones=8, eps=0.0)
    assert release.pnmi == pytest.approx(ours.pnmi, rel=1e-12)
    assert release.codebook_perplexity == pytest.approx(ours.codebook_perplexity, rel=1e-12)
    assert release.bitrate == ours.bitrate


def test_metrics_errors():
    with pytest.raises(ValueError, match="'u'.*7 phone frames but 2 units"):
        M.build_count_matrix({"u": (["a"] * 7, [0, 1])}, 2, 2, 2)
    with pytest.raises(IndexError, match="phone 'c'"):
        M.build_count_matrix({"u": (["a", "b", "c", "c"], [0, 1])}, 2, 2, 2)
    with pytest.raises(IndexError, match="unit 5"):
        M.build_count_matrix({"u": (["a", "b", "a", "a"], [0, 5])}, 2, 2, 2)


# --------------------------------------------------------------------------- loading
def tiny_checkpoint(tmp_path: Path, golden: dict, *, with_config: bool = True) -> Path:
    entry = golden["models"]["spidr"]
    path = tmp_path / "final.pt"
    torch.save({"model": {f"module.{k}": v for k, v in entry["state_dict"].items()}}, path)
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"model": entry["config"]}))
    return path


def test_build_model_and_raw_checkpoints_return_the_release_mode(tmp_path, golden):
    """0.2.0 builds a fresh module and loads it: training mode. The published constructors return eval mode."""
    entry = golden["models"]["spidr"]
    path = tiny_checkpoint(tmp_path, golden)
    for model in (
        build_model(checkpoint=path, model_type="spidr"),
        model_from_raw_checkpoint(SpidR, SpidRConfig, path),
    ):
        assert type(model) is SpidR and model.training and not model.teacher.training
        equal_state(model.state_dict(), entry["state_dict"])
    assert build_model(cfg=config_of(entry)).training
    with torch.device("meta"):
        assert not spidr_base(pretrained=False, check_hash=True, progress=False).training
    with pytest.raises(ValueError, match=r"must be a \.pt file"):
        model_from_raw_checkpoint(SpidR, SpidRConfig, tmp_path / "final.ckpt")
    with pytest.raises(ValueError, match="cfg must be"):
        build_model(cfg=object())  # type: ignore[arg-type]


def test_raw_checkpoint_without_config_warns_and_uses_the_default(tmp_path, golden):
    path = tiny_checkpoint(tmp_path, golden, with_config=False)
    with pytest.warns(UserWarning, match="No config.json"), pytest.raises(CheckpointError, match="shape mismatch"):
        model_from_raw_checkpoint(SpidR, SpidRConfig, path)  # the default config is the base model's


def test_check_hash_follows_torch_hub(tmp_path, monkeypatch):
    """torch.hub's rule: ``name-<hex>.ext`` carries a SHA-256 prefix. The release's names carry none."""
    assert pretrained.HASH_PREFIX.pattern == torch.hub.HASH_REGEX.pattern
    assert [pretrained.hash_prefix(info.filename) for info in pretrained.PRETRAINED.values()] == [None] * 3
    blob = tmp_path / "blob"
    blob.write_bytes(b"not really a checkpoint")
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    good = tmp_path / f"spidr_base-{digest[:10]}.pt"
    good.write_bytes(blob.read_bytes())
    assert pretrained.resolve_pretrained_file("spidr_base", good, check_hash=True) == good
    bad = tmp_path / "spidr_base-0123abcd.pt"
    bad.write_bytes(blob.read_bytes())
    assert pretrained.resolve_pretrained_file("spidr_base", bad) == bad  # not checked without check_hash
    with pytest.raises(CheckpointError, match="does not start with '0123abcd'"):
        spidr_base(checkpoint=bad, check_hash=True)

    calls = []  # a download of a name with a prefix hands it to torch.hub, which checks it while downloading
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv(pretrained.CHECKPOINT_DIR_ENV, raising=False)
    info = pretrained.PretrainedModel("https://example.invalid/x-abc123.pt", "x-abc123.pt", "spidr")
    monkeypatch.setitem(pretrained.PRETRAINED, "spidr_base", info)

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(hash_prefix)
        Path(dst).write_bytes(b"x")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with pytest.raises(CheckpointError):  # downloaded, then its (fake) hash does not match
        pretrained.resolve_pretrained_file("spidr_base", check_hash=True)
    assert calls == ["abc123"]


# --------------------------------------------------------------------------- bad inputs
def test_bad_masks_and_waveforms_are_refused_naming_the_argument(golden):
    model, inputs = model_of(golden["models"]["dinosr"]), golden["inputs"]
    wavs, pad = inputs["wavs"], inputs["masks"]["pad"]
    batch, frames = pad.shape[0], pad.shape[-1]
    calls = [
        lambda mask: model.get_intermediate_outputs(wavs, attention_mask=mask),
        lambda mask: model.get_codebooks(wavs, attention_mask=mask),
        lambda mask: model(wavs, attention_mask=mask),
        lambda mask: model.student(torch.zeros(batch, frames, 16), mask),
        lambda mask: model.student.get_intermediate_outputs(torch.zeros(batch, frames, 16), mask),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 1, 1, frames\)"):
            call(pad[:, 0, 0])  # (B, T)
        with pytest.raises(
            ValueError,
            match=r"\(batch, 1, frames, frames\) = \(3, 1, 14, 14\) \(per query frame\), got \(3, 1, 14, 13\)",
        ):
            call(torch.ones(batch, 1, frames, frames - 1, dtype=torch.bool))
        with pytest.raises(ValueError, match="attention_mask must be a bool tensor"):
            call(pad.float())
        with pytest.raises(TypeError, match="attention_mask must be a bool tensor"):  # as this library raised before
            call(pad.float())
    with pytest.raises(ValueError, match=r"waveforms must have shape \(batch, samples\), got \(1, 3, 4800\)"):
        model.get_intermediate_outputs(wavs[None])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, frames, 16\)"):
        model.student(torch.zeros(frames, 16))
