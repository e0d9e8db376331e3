"""Ranger: RAdam + Lookahead + gradient centralisation; the first steps must not go uphill."""
import copy

import pytest
import torch

from refinestyle.optim import Ranger


def steep_quadratic(seed=0, n=64, scale=1e3):
    """f(x) = scale/2 * sum(h_i x_i^2) with curvatures h in [1, 100]: large gradients."""
    generator = torch.Generator().manual_seed(seed)
    curvature = 1 + 99 * torch.rand(n, generator=generator)
    start = torch.randn(n, generator=generator)

    def loss(x):
        return 0.5 * scale * (curvature * x * x).sum()

    return loss, start


def run(loss_fn, start, steps, **options):
    x = torch.nn.Parameter(start.clone())
    optimizer = Ranger([x], **options)
    losses = [loss_fn(x).item()]
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(x).backward()
        optimizer.step()
        losses.append(loss_fn(x).item())
    return losses, x


def test_first_steps_do_not_go_uphill():
    loss_fn, start = steep_quadratic()
    losses, _ = run(loss_fn, start, 100, lr=0.1)
    # the warm-up steps 1-5 (adaptive rate not yet tractable) go strictly downhill; later,
    # Lookahead's pull-backs (every 6th step) never rise above the start
    assert all(b < a for a, b in zip(losses[:5], losses[1:6])), losses[:6]
    assert max(losses[1:]) < losses[0]
    assert losses[-1] < 0.5 * losses[0]

    # Ranger's original warm-up (an SGD step of size lr * |g|) overshoots on the same problem
    sgd_losses, _ = run(loss_fn, start, 1, lr=0.1, warmup="sgd")
    assert sgd_losses[1] > 100 * sgd_losses[0]

    # "skip" takes no step at all until the adaptive rate is tractable
    skip_losses, _ = run(loss_fn, start, 5, lr=0.1, warmup="skip")
    assert skip_losses == [skip_losses[0]] * 6


def test_converges_on_a_least_squares_problem():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(40, 8, generator=generator)
    target = a @ torch.randn(8, 3, generator=generator)

    def loss_fn(w):
        return ((a @ w - target) ** 2).mean()

    losses, _ = run(loss_fn, torch.randn(8, 3, generator=generator), 400, lr=0.3, use_gc=False)
    assert losses[-1] < 1e-3 * losses[0]


def test_lookahead_interpolates_towards_the_fast_weights():
    loss_fn, start = steep_quadratic(seed=2, scale=1.0)
    _, fast = run(loss_fn, start, 6, lr=1e-2, lookahead_steps=10**9)  # no synchronisation
    _, synced = run(loss_fn, start, 6, lr=1e-2, lookahead_steps=6, lookahead_alpha=0.5)
    assert torch.allclose(synced, start + 0.5 * (fast - start), atol=1e-7)
    assert not torch.allclose(synced, fast)


def test_gradient_centralisation_removes_the_mean_of_each_row():
    torch.manual_seed(3)
    start = torch.randn(4, 5)
    offsets = torch.tensor([[3.0], [-4.5], [5.0], [1.0]])

    def loss_fn(w):
        return (w * (offsets + torch.arange(5.0))).sum()

    for use_gc in (True, False):
        _, x = run(loss_fn, start, 1, lr=0.1, use_gc=use_gc)
        row_means = (x.detach() - start).mean(dim=1)
        if use_gc:
            assert row_means.abs().max() < 1e-7
        else:
            assert row_means.abs().min() > 1e-3


def test_state_dict_resumes_exactly():
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    data = torch.randn(16, 6), torch.randn(16, 1)

    def step(net, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(data[0]), data[1]).backward()
        optimizer.step()

    optimizer = Ranger(model.parameters(), lr=1e-2)
    for _ in range(5):
        step(model, optimizer)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for _ in range(4):  # crosses a Lookahead synchronisation (step 6)
        step(model, optimizer)

    resumed = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    resumed.load_state_dict(saved_model)
    resumed_optimizer = Ranger(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved_optimizer)
    for _ in range(4):
        step(resumed, resumed_optimizer)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_rejects_bad_settings():
    x = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="lr"):
        Ranger([x], lr=0)
    with pytest.raises(ValueError, match="warmup"):
        Ranger([x], warmup="adam")
    with pytest.raises(ValueError, match="lookahead_alpha"):
        Ranger([x], lookahead_alpha=1.5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_without_lookahead_and_centralisation_it_takes_radams_steps(weight_decay):
    """Ranger is RAdam + Lookahead + gradient centralisation: with the other two off and the
    original warm-up, its steps are torch.optim.RAdam's (second-moment bias correction,
    rectification, the SGD-with-momentum steps before the variance is tractable), and its
    weight decay is RAdam's decoupled one. Ranger's steps take the loss as a closure."""
    torch.manual_seed(0)
    ours = torch.randn(8, 5, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_(True)
    target, weights = torch.randn(8, 5), torch.rand(8, 5) * 3
    ranger = Ranger([ours], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                    lookahead_steps=10**9, warmup="sgd", use_gc=False)
    radam = torch.optim.RAdam([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                              decoupled_weight_decay=True)
    start = ours.detach().clone()
    for _ in range(30):
        for parameter, optimizer in ((ours, ranger), (theirs, radam)):
            def closure(parameter=parameter, optimizer=optimizer):
                optimizer.zero_grad()
                loss = (weights * (parameter - target) ** 2).sum()
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            assert torch.is_tensor(loss) and loss.item() > 0
        moved = (theirs - start).norm()
        assert ((ours - theirs).norm() / moved).item() < 1e-4
