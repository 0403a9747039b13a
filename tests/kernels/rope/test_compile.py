"""The fake implementation of apply_rope (what ``torch.compile`` traces) promises the
layouts the real one returns: contiguous outputs whatever the input strides, so compiled code
never miscompiles a permuted input."""

import pytest

from tests.support.custom_ops import check_fake_strides

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("op", ["apply_rope"])
def test_fake_implementation_promises_the_real_strides(op):
    check_fake_strides(op)
