"""lowbit.torch: nn.Linear swapped for lowbit kernels (skipped without PyTorch)."""
import numpy as np
import pytest

import lowbit as lb

torch = pytest.importorskip("torch")
import lowbit.torch as lbt  # noqa: E402


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Linear(96, 128, bias=False), torch.nn.GELU()),
        torch.nn.Linear(128, 10))


def numpy_path(model, x, **fmt):
    """The same network on lb.Linear directly."""
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    h = x
    for i, m in enumerate(lin):
        b = None if m.bias is None else m.bias.detach().numpy()
        h = lb.Linear(m.weight.detach().numpy(), b, **fmt)(h)
        if i == 0:
            h = np.maximum(h, 0)
        elif i == 1:
            h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()
    return h


@pytest.mark.parametrize("fmt", [{}, {"bits": 4, "group_size": 32, "symmetric": False},
                                 {"bits": 4, "group_size": 32, "activations": "float"}])
def test_quantize_model_matches_the_numpy_path(fmt, rng):
    model = small_model()
    x = rng.normal(size=(5, 64)).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    out = lbt.quantize_model(model, **fmt)
    assert out is model
    assert sum(isinstance(m, lbt.LowbitLinear) for m in model.modules()) == 3
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.inference_mode():
        y = model(torch.from_numpy(x))
    assert y.dtype == torch.float32 and y.shape == (5, 10)
    np.testing.assert_array_equal(y.numpy(), numpy_path(small_model(), x, **fmt))
    assert np.abs(y.numpy() - ref).max() < 0.1 * np.abs(ref).max()


def test_inputs_of_any_rank_and_layout(rng):
    model = lbt.quantize_model(torch.nn.Linear(64, 32))  # a bare Linear comes back replaced
    assert isinstance(model, lbt.LowbitLinear)
    x = torch.from_numpy(rng.normal(size=(2, 3, 64)).astype(np.float32))
    y = model(x)
    assert y.shape == (2, 3, 32)
    np.testing.assert_array_equal(model(x.transpose(0, 1).contiguous().transpose(0, 1)).numpy(),
                                  y.numpy())  # a strided view gives the same result
    np.testing.assert_array_equal(model(x.half()).numpy(), model(x.half().float()).numpy())
    with pytest.raises(TypeError, match="float32"):
        model(x.double())


def test_include_min_features_and_errors():
    model = small_model()
    lbt.quantize_model(model, include=lambda name: name != "3", bits=4, group_size=32)
    assert isinstance(model[3], torch.nn.Linear) and isinstance(model[0], lbt.LowbitLinear)
    assert "bits=4" in repr(model[0])
    model = lbt.quantize_model(small_model(), min_features=65)
    assert isinstance(model[0], torch.nn.Linear) and isinstance(model[2][0], lbt.LowbitLinear)
    with pytest.raises(ValueError, match="^0: group_size"):
        lbt.quantize_model(torch.nn.Sequential(torch.nn.Linear(48, 8)), bits=4, group_size=32)


def test_calibrated_methods_pass_through(rng):
    lin = torch.nn.Linear(64, 16)
    cal = rng.normal(size=(128, 64)).astype(np.float32)
    m = lbt.LowbitLinear.from_linear(lin, bits=4, group_size=32, method="gptq", calibration=cal,
                                     act_order=True)
    assert m.layer.weight.perm is not None
