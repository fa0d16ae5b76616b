"""torch.compile(fullgraph=True) traces a SpidR training step through the spidr.ops custom ops."""

from __future__ import annotations

import pytest
import torch

import spidr.ops as ops
from tests.conftest import load_fixture, model_from_fixture


@pytest.mark.skipif("cpp" not in ops.backends("cpu"), reason="the compiled extension is not built")
def test_compiled_training_step_matches_eager():
    fixture = load_fixture("spidr_small.pt")
    torch._dynamo.reset()

    def forward(model, wavs, mask_indices):
        loss, ppl = model(wavs, mask_indices=mask_indices)
        return loss, ppl["target_ppl"], ppl["pred_ppl"]

    results = []
    with ops.use_backend("cpp"):
        for compiled in (False, True):
            model = model_from_fixture(fixture).train()
            # fullgraph: any graph break raises. AOTAutograd compiles the backward graph with it.
            fn = torch.compile(forward, fullgraph=True) if compiled else forward
            loss, target_ppl, pred_ppl = fn(model, fixture["wavs_crop"], fixture["mask_indices_crop"])
            loss.mean().backward()
            loss = loss.detach()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            codebooks = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("codebooks.")}
            results.append((loss, target_ppl, pred_ppl, grads, codebooks))
    assert ops.last_backend() == "cpp"
    (eager_loss, eager_t, eager_p, eager_grads, eager_cb), (loss, t, p, grads, cb) = results
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, fixture["train_loss_crop"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, eager_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p, eager_p, atol=1e-5, rtol=1e-5)
    assert sorted(grads) == sorted(eager_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    for name, value in cb.items():
        torch.testing.assert_close(value, eager_cb[name], atol=1e-5, rtol=0)
