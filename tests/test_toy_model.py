"""The toy denoiser: every layer its own weights; the timestep path is per sample."""

import torch

from ddpmkit.models.toy import ToyMLP


def test_layers_do_not_share_weights():
    model = ToyMLP(2, 16, 3)
    ptrs = [layer.fc1.weight.data_ptr() for layer in model.layers]
    assert len(set(ptrs)) == 3
    assert len({id(layer) for layer in model.layers}) == 3
    # Parameters grow with the number of layers (the reference's shared stack did not).
    n1 = sum(p.numel() for p in ToyMLP(2, 16, 1).parameters())
    n3 = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    assert n3 - n1 == 2 * per_layer
    # Changing one layer leaves the others alone.
    before = model.layers[1].fc1.weight.clone()
    with torch.no_grad():
        model.layers[0].fc1.weight.add_(1.0)
    assert torch.equal(model.layers[1].fc1.weight, before)


def test_output_shapes():
    x, t = torch.randn(5, 2), torch.randint(0, 50, (5,))
    assert ToyMLP(2, 16, 2)(x, t).shape == (5, 2)
    assert ToyMLP(2, 16, 2, out_features=4)(x, t).shape == (5, 4)
    assert ToyMLP(2, 16, 2, fourier_features=8, fourier_scale=2.0)(x, t).shape == (5, 2)


def test_batched_output_equals_per_sample_output():
    torch.manual_seed(0)
    model = ToyMLP(2, 16, 2, fourier_features=4).eval()
    x, t = torch.randn(6, 2), torch.tensor([3, 0, 3, 9, 1, 9])
    batched = model(x, t)
    single = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-6)
    # and the timestep matters
    assert not torch.allclose(model(x, t), model(x, t + 1))


def test_fourier_frequencies_are_fixed_buffers_saved_with_the_weights():
    a = ToyMLP(2, 16, 1, fourier_features=4, fourier_seed=3)
    b = ToyMLP(2, 16, 1, fourier_features=4, fourier_seed=4)
    assert "fourier_freqs" in a.state_dict()
    assert all(p is not a.fourier_freqs for p in a.parameters())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.fourier_freqs, b.fourier_freqs)
