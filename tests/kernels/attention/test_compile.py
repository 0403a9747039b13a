"""The fake implementations of paged_attention and rope_attention (what ``torch.compile``
traces) promise the layouts the real ones return: contiguous outputs whatever the input
strides, so compiled code never miscompiles a permuted input."""

import pytest

from tests.support.custom_ops import check_fake_strides

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("op", ["paged_attention", "rope_attention"])
def test_fake_implementation_promises_the_real_strides(op):
    check_fake_strides(op)
