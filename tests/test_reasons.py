"""Reasons are data: every block left unfused carries a code from report.REASON_CODES and the
original graph nodes its reason is about, in the report and its JSON."""
from __future__ import annotations

import json

import numpy as np

import pytest
from onnx import helper

from conftest import Builder, repvgg_block
from reparam_onnx import fuse_with_report
from reparam_onnx.report import REASON_CODES

C = 4
ONE = (1, 1, 1, 1)


def _relu_branch(b, x):
    """One Sum node: no part of it can be fused on its own."""
    return b.node("Sum", [b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C), b.conv(x, C, C, (1, 1)),
                          b.node("Relu", [b.conv(x, C, C, (1, 1))])])


def _border(b, x):
    return b.conv(b.bn(x, C), C, C, (3, 3), pads=ONE)


def _strides(b, x):
    return b.add(b.conv(x, C, C, (3, 3), (2, 2), ONE), b.conv(x, C, C, (1, 1)))


def _cost(b, x):
    return b.add(b.conv(x, C, C, (3, 3), pads=ONE, group=C), b.conv(x, C, C, (1, 1)))


def _operand(b, x):
    weight = b.input([C, C, 1, 1], "w_in")   # a weight fed at run time
    return b.add(b.node("Conv", [x, weight], kernel_shape=[1, 1]), b.conv(x, C, C, (3, 3), pads=ONE))


CASES = {"not_linear": _relu_branch, "border": _border, "geometry": _strides, "cost": _cost,
         "operand": _operand}


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_refusal_has_its_code_and_original_nodes(code):
    b = Builder(seed=len(code))
    x = b.input([1, C, 9, 9])
    model = b.model(CASES[code](b, x))
    result = fuse_with_report(model, verify=False)
    unfused = result.report.unfused
    assert unfused and all(r.code in REASON_CODES for r in unfused)
    assert code in [r.code for r in unfused], [(r.code, r.reason) for r in unfused]
    names = {n.name for n in model.graph.node}
    for r in unfused:
        assert set(r.reason_nodes) <= names, r.reason_nodes
    as_json = json.loads(json.dumps(result.report.to_dict(), default=str))
    assert {"code", "reason_nodes"} <= set(as_json["blocks"][0])


def test_border_reason_names_the_conv():
    b = Builder(seed=3)
    x = b.input([1, C, 9, 9])
    model = b.model(_border(b, x))
    (block,) = fuse_with_report(model, verify=False).report.unfused
    assert block.code == "border" and block.reason_nodes == ["conv1"]


def test_a_node_fused_by_an_earlier_pass_is_named_by_its_originals():
    """Pass 1 fuses a RepVGG block read through a BN; pass 2 finds that BN before the block's
    padded conv (a node pass 1 wrote): the reason names the block's original nodes."""
    b = Builder(seed=4)
    x = b.input([1, C, 9, 9])
    model = b.model(repvgg_block(b, b.bn(x, C), C, C))
    result = fuse_with_report(model, verify=False)
    (left,) = result.report.unfused
    assert left.code == "border"
    originals = {n.name for n in model.graph.node if n.op_type != "BatchNormalization" or n.input[0] != "x"}
    assert set(left.reason_nodes) == originals
    assert "reparam" not in left.reason and "(fused)" in left.reason   # the text names them too


def test_attention_products_are_not_blocks():
    """q·kᵀ scaled (attention): the MatMul multiplies two activations; nothing to fuse, nothing to
    report. A Conv whose weight is an initializer listed as a graph input still is a block."""
    b = Builder(seed=6)
    q = b.input([2, 5, 8], "q")
    k = b.node("Transpose", [b.input([2, 5, 8], "k")], perm=[0, 2, 1])   # kᵀ, computed from an input
    y = b.node("Mul", [b.node("MatMul", [q, k]), b.const(np.array(0.25))])
    result = fuse_with_report(b.model(y), verify=False)
    assert not result.report.blocks
    b = Builder(seed=7)
    x = b.input([1, C, 9, 9])
    model = b.model(b.bn(b.conv(x, C, C, (3, 3), pads=ONE), C))
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    (left,) = fuse_with_report(model, verify=False).report.unfused
    assert "graph input" in left.reason and left.code == "operand"


def test_a_sum_with_a_product_of_activations_is_named_not_linear():
    """x·xᵀ beside a conv of x (an SSM mixer's residual): the reason names the MatMul and says the
    branch is not linear, not that the convs differ in rank."""
    b = Builder(seed=8)
    x = b.input([1, C, C])
    gram = b.node("MatMul", [x, b.node("Transpose", [x], perm=[0, 2, 1])])
    y = b.add(gram, b.conv(x, C, C, (1,)))
    (left,) = fuse_with_report(b.model(y), verify=False).report.unfused
    assert left.code == "not_linear" and left.reason_nodes == ["matmul1"], (left.code, left.reason)
