"""upfirdn2d against a direct loop over its definition, and rosinality's filter sizes."""
import numpy as np
import pytest
import torch

from kernel_cases import RecordedOps
from refinestyle_kernels import make_blur_kernel, upfirdn2d


def upfirdn2d_loops(x, kernel, up, down, pad):
    """out[o] = sum_j kernel[j] * padded[o*down + kh-1 - j]: true convolution, written as loops."""
    batch, channels, height, width = x.shape
    upsampled = np.zeros((batch, channels, height * up, width * up))
    upsampled[:, :, ::up, ::up] = x
    pad0, pad1 = pad
    padded = np.pad(upsampled, ((0, 0), (0, 0), (pad0, pad1), (pad0, pad1)))
    kh, kw = kernel.shape
    out_h = (padded.shape[2] - kh) // down + 1
    out_w = (padded.shape[3] - kw) // down + 1
    out = np.zeros((batch, channels, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            for jy in range(kh):
                for jx in range(kw):
                    out[:, :, oy, ox] += kernel[jy, jx] * padded[:, :, oy * down + kh - 1 - jy, ox * down + kw - 1 - jx]
    return out


# (2, 1, (2, 1)): the toRGB skip's upsampling, and (3, 1, (2, 2)), (2, 1, (3, 2)): one transposed
# conv; (2, 1, (1, 2)), (2, 1, (4, 1)): pads it cannot express (zero insertion, pad, conv)
@pytest.mark.parametrize(
    "up, down, pad",
    [(2, 1, (2, 1)), (3, 1, (2, 2)), (2, 1, (3, 2)), (2, 1, (1, 2)), (2, 1, (4, 1)), (1, 1, (1, 1)), (1, 2, (1, 1)),
     (2, 2, (0, 1))],
)  # fmt: skip
def test_upfirdn2d_matches_its_definition(up, down, pad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
    kernel = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # asymmetric, non-square: catches a missing flip
    out = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    np.testing.assert_allclose(out.numpy(), upfirdn2d_loops(x.numpy(), kernel.numpy(), up, down, pad), atol=1e-12)


def test_blur_kernel_is_normalised_outer_product():
    kernel = make_blur_kernel([1, 3, 3, 1], dtype=torch.float64)
    assert kernel.shape == (4, 4)
    assert torch.isclose(kernel.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.isclose(kernel[1, 2], torch.tensor(9 / 64, dtype=torch.float64))


def test_upfirdn2d_rejects_bad_input():
    with pytest.raises(ValueError, match="x"):
        upfirdn2d(torch.randn(3, 4, 4), torch.ones(2, 2))
    with pytest.raises(ValueError, match="kernel"):
        upfirdn2d(torch.randn(1, 3, 4, 4), torch.ones(4))


def test_upsampling_filter_is_made_into_a_conv_weight_once():
    """The toRGB skip's upsampling (one depthwise transposed conv) keeps the depthwise weight
    made from a filter buffer: later calls launch the conv alone, and an in-place change of
    the buffer is picked up."""
    kernel = make_blur_kernel([1, 3, 3, 1], dtype=torch.float64) * 4
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    upfirdn2d(x, kernel, up=2, pad=(2, 1))
    with RecordedOps() as ops:
        out = upfirdn2d(x, kernel, up=2, pad=(2, 1))
    assert [name for name in ops.names if name not in ("view", "unsqueeze", "expand")] == ["convolution"], ops.names
    assert np.allclose(out.numpy(), upfirdn2d_loops(x.numpy(), kernel.numpy(), 2, 1, (2, 1)))
    kernel.mul_(0.5)
    assert np.allclose(upfirdn2d(x, kernel, up=2, pad=(2, 1)).numpy(), 0.5 * out.numpy())
