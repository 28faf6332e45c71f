"""Comparisons of state trees (nested dicts, lists and tuples of tensors and plain values),
shared by the Flower tests: exact (:func:`assert_same`) or up to a tolerance on floating
tensors (:func:`assert_close`, for SecAgg+'s stochastically rounded sums)."""

import torch


def assert_same(a, b, path="state", close=None):
    """Exact equality of two trees: tensors with ``torch.equal`` (same dtype and shape),
    everything else with ``==``. With ``close = (rtol, atol)``, floating tensors need only
    be ``torch.allclose``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a, b)
        if close is not None and a.is_floating_point():
            assert torch.allclose(a, b, rtol=close[0], atol=close[1]), (path, a, b)
        else:
            assert torch.equal(a, b), (path, a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(a), sorted(b))
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}", close)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}", close)
    else:
        assert a == b, (path, a, b)


def assert_close(a, b, path="state", rtol=1e-5, atol=1e-5):
    """:func:`assert_same` with floating tensors within ``rtol``/``atol``."""
    assert_same(a, b, path, close=(rtol, atol))
