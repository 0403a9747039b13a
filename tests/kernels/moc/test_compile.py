"""The fake implementation of moc_attention (what ``torch.compile`` traces) promises the
layouts the real one returns: contiguous outputs whatever the input strides, so compiled code
never miscompiles a permuted input."""

import pytest

from tests.support.custom_ops import check_fake_strides

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("op", ["moc_attention"])
def test_fake_implementation_promises_the_real_strides(op):
    check_fake_strides(op)
