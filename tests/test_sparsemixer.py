"""SparseMixer-v2 (model/sparsemixer.py), Phi-3.5-MoE's router, against transformers' own."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("training", [False, True])
def test_sparsemixer_equals_phi_3_5_moe_s_router(training):
    """SparseMixer-v2 against transformers' own function (phimoe.sparsemixer): the same experts,
    gates and (training: Gumbel samples and Heun's estimate from the same random stream)
    gradients to the logits."""
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    from moespec.model.sparsemixer import sparsemixer

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 2
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    weights = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    gate, expert = sparsemixer(ours_in, k=2, jitter_eps=0.1, training=training)
    torch.manual_seed(5)
    their_gate, their_expert = phimoe.sparsemixer(theirs_in, jitter_eps=0.1, training=training)
    assert torch.equal(expert, their_expert)
    torch.testing.assert_close(gate, their_gate, rtol=0, atol=1e-7)
    (gate * weights).sum().backward()
    (their_gate * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-7)
    assert ours_in.grad.abs().sum() > 0
