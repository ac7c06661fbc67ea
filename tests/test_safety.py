"""Exactness under attack: a wrong kernel is caught before it is written."""
from __future__ import annotations

import pytest

from conftest import Builder, assert_equivalent, repvgg_block
from reparam_onnx import VerificationError, fuse_with_report, kernels


def _model():
    b = Builder(seed=41)
    x = b.input([1, 4, 9, 7])
    h = b.node("Relu", [repvgg_block(b, x, 4, 4)])
    return b.model(b.node("Relu", [repvgg_block(b, h, 4, 4)]))


@pytest.fixture
def wrong_identity(monkeypatch):
    """An identity kernel that drops the last channel: the arithmetic is wrong, not the graph."""
    real = kernels.identity_kernel

    def broken(channels, group, rank):
        k = real(channels, group, rank)
        k[-1] = 0
        return k
    monkeypatch.setattr(kernels, "identity_kernel", broken)


def test_block_check_leaves_wrong_blocks_unfused(wrong_identity):
    model = _model()
    result = fuse_with_report(model)
    assert not result.report.fused
    assert all("run alone differs" in b.reason for b in result.report.blocks)
    assert_equivalent(model, result.model)


def test_whole_model_check_refuses_a_wrong_model(wrong_identity):
    with pytest.raises(VerificationError) as caught:
        fuse_with_report(_model(), check_blocks=False)
    assert not caught.value.report.verification.passed
    assert "verification failed" in str(caught.value)


def test_block_checks_report_their_error():
    result = fuse_with_report(_model())
    assert all(b.fused and 0 <= b.check < 1e-5 for b in result.report.blocks)
