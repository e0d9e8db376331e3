"""The Refinement value and RefinementTokens: validation, layer lookup, expand, cat, to/detach."""
from __future__ import annotations

import pytest
import torch

from refinestyle.generator import Generator
from refinestyle.refinement import Refinement, RefinementTokens, refinement_layer_shapes


def tokens(batch, count, channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return torch.randn(*lead, count, channels, generator=g)


def test_layer_lookup_and_properties():
    p = [tokens(None, 4, 6, 1), tokens(None, 4, 5, 2)]
    q = [tokens(None, 4, 8, 3), tokens(None, 4, 6, 4)]
    refinement = Refinement(p, q, num_layers=5)
    assert (refinement.num_layers, refinement.num_refined, refinement.first_layer) == (5, 2, 3)
    assert refinement.batch_size is None
    assert refinement.layer_shapes == [(8, 6), (6, 5)]
    assert refinement.for_layer(0) == (None, None) and refinement.for_layer(2) == (None, None)
    assert refinement.for_layer(3)[0] is p[0] and refinement.for_layer(4)[1] is q[1]
    with pytest.raises(IndexError):
        refinement.for_layer(5)
    refinement.check_layer_shapes([(8, 8)] * 3 + [(8, 6), (6, 5)])
    with pytest.raises(ValueError, match="conv layer 4 has Cin=6, Cout=6"):
        refinement.check_layer_shapes([(8, 8)] * 3 + [(8, 6), (6, 6)])


def test_mixed_shared_and_per_sample_pair_is_expanded_for_the_op():
    refinement = Refinement([tokens(3, 2, 4)], [tokens(None, 2, 5)], num_layers=1)
    assert refinement.batch_size == 3
    p, q = refinement.for_layer(0)
    assert p.shape == (3, 2, 4) and q.shape == (3, 2, 5)
    assert torch.equal(q[2], refinement.q[0])


@pytest.mark.parametrize(
    "p, q, num_layers, error, message",
    [
        ([tokens(None, 2, 4)], [tokens(None, 3, 5)], 2, ValueError, "same number of tokens"),
        ([tokens(None, 2, 4)], [], 2, ValueError, "one tensor per refined layer"),
        ([tokens(None, 2, 4)] * 3, [tokens(None, 2, 4)] * 3, 2, ValueError, "between 1 and num_layers=2"),
        ([tokens(2, 2, 4)], [tokens(3, 2, 4)], 2, ValueError, "one batch size"),
        ([torch.randn(2, 2, 2, 4)], [tokens(None, 2, 4)], 2, ValueError, "\\[B, L, Cout\\] or \\[L, Cout\\]"),
        ([torch.ones(2, 4, dtype=torch.long)], [tokens(None, 2, 4)], 2, TypeError, "floating point"),
        (tokens(None, 2, 4), [tokens(None, 2, 4)], 2, TypeError, "sequences"),
        ([tokens(None, 2, 4)], [tokens(None, 2, 4)], 0, ValueError, "num_layers"),
    ],
)
def test_validation(p, q, num_layers, error, message):
    with pytest.raises(error, match=message):
        Refinement(p, q, num_layers)


def test_expand_and_batch_slice():
    shared = Refinement([tokens(None, 2, 4)], [tokens(None, 2, 3)], 3)
    expanded = shared.expand(5)
    assert expanded.batch_size == 5 and expanded.p[0].shape == (5, 2, 4)
    assert torch.equal(expanded.p[0][4], shared.p[0])
    assert expanded.batch_slice(1, 3).p[0].shape == (2, 2, 4)
    with pytest.raises(ValueError, match="batch size 5"):
        expanded.expand(4)
    assert expanded.expand(5).batch_size == 5


def test_cat_mixes_groups_and_pads_with_zero_tokens():
    a = Refinement([tokens(None, 2, 4, 1)], [tokens(None, 2, 3, 2)], num_layers=3)  # layer 2 only, L=2
    b = Refinement(
        [tokens(2, 3, 5, 3), tokens(2, 3, 4, 4)], [tokens(2, 3, 6, 5), tokens(2, 3, 3, 6)], num_layers=3
    )  # layers 1-2, L=3, per-sample
    mixed = Refinement.cat([a, None, b], [2, 1, 2])
    assert (mixed.batch_size, mixed.first_layer, mixed.num_tokens) == (5, 1, (3, 3))
    p1, q1 = mixed.for_layer(1)
    assert torch.equal(p1[:3], torch.zeros(3, 3, 5)) and torch.equal(q1[3:], b.q[0])
    p2, q2 = mixed.for_layer(2)
    assert torch.equal(p2[0, :2], a.p[0]) and torch.equal(p2[1, :2], a.p[0])
    assert torch.equal(p2[:2, 2], torch.zeros(2, 4))  # a's missing third token
    assert torch.equal(p2[2], torch.zeros(3, 4)) and torch.equal(p2[3:], b.p[1])
    # residuals p^T q of each sample are those of its own group
    for sample, (source, index) in enumerate([(a, None), (a, None), (None, None), (b, 0), (b, 1)]):
        residual = p2[sample].t() @ q2[sample]
        if source is None:
            assert torch.equal(residual, torch.zeros(4, 3))
        else:
            sp, sq = source.for_layer(2)
            sp, sq = (sp, sq) if index is None else (sp[index], sq[index])
            assert torch.allclose(residual, sp.t() @ sq)

    with pytest.raises(ValueError, match="batch size 2"):
        Refinement.cat([b], [3])
    with pytest.raises(ValueError, match="at least one Refinement"):
        Refinement.cat([None], [1])
    with pytest.raises(ValueError, match="conv layers"):
        Refinement.cat([a, Refinement([tokens(None, 2, 4)], [tokens(None, 2, 3)], 4)], [1, 1])


def test_cat_keeps_gradients():
    source = tokens(None, 2, 4).requires_grad_(True)
    mixed = Refinement.cat([Refinement([source], [tokens(None, 2, 3)], 1), None], [3, 2])
    mixed.p[0].sum().backward()
    assert torch.equal(source.grad, torch.full((2, 4), 3.0))


def test_to_and_detach():
    p = tokens(None, 2, 4).requires_grad_(True)
    refinement = Refinement([p], [tokens(None, 2, 3)], 2)
    assert refinement.to(torch.float64).p[0].dtype == torch.float64
    assert not refinement.detach().p[0].requires_grad
    assert "layers 1..1 of 2" in repr(refinement)


def test_refinement_tokens_module():
    generator = Generator(16, style_dim=8, n_mlp=1, channels={4: 8, 8: 6, 16: 4})
    assert refinement_layer_shapes(generator, 2) == [(6, 4), (4, 4)]
    with pytest.raises(ValueError, match="num_refined"):
        refinement_layer_shapes(generator, 6)
    module = RefinementTokens.for_generator(generator, num_refined=3, num_tokens=5, scale_init=0.1)
    assert module.num_trainable() == 5 * (6 + 6) + 5 * (6 + 4) + 5 * (4 + 4) + 3 * 2 * 5  # layers 2, 3, 4
    assert sorted(module.state_dict())[:4] == ["layers.0.A", "layers.0.B", "layers.0.P", "layers.0.Q"]
    refinement = module()
    assert (refinement.num_layers, refinement.first_layer, refinement.batch_size) == (5, 2, None)
    layer = module.layers[1]
    assert torch.equal(refinement.p[1], layer.A[:, None] * layer.P)
    assert torch.equal(refinement.q[1], layer.B[:, None] * layer.Q)
    image, _ = generator([torch.randn(2, 8)], refinement=refinement)
    image.mean().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in module.parameters())
