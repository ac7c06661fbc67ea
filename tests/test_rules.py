"""Rule files: validation, priorities, user rule folders, and a positive and a negative case per rule."""
from __future__ import annotations

import textwrap

import pytest

from conftest import ROOT, Builder, fuse_and_check, repvgg_block
from reparam_onnx import InputError, fuse_with_report
from reparam_onnx.rulebook import RuleError, load_rules, parse_rule


def _dw(b, x, c, k, dil=1):
    p = dil * (k // 2)
    return b.bn(b.conv(x, c, c, (k, k), pads=(p,) * 4, dilations=(dil, dil), group=c, bias=False), c)


def _block(kind):
    """Builds a model for a named case; returns (model, block output name)."""
    b = Builder(seed=len(kind))
    c = 8
    x = b.input([1, c, 11, 13])
    conv = lambda k, pads, g=1: b.bn(b.conv(x, c, c, k, pads=pads, group=g, bias=False), c)  # noqa: E731
    k3 = lambda g=1: conv((3, 3), (1, 1, 1, 1), g)  # noqa: E731
    k1 = lambda g=1: conv((1, 1), (0, 0, 0, 0), g)  # noqa: E731
    y = {
        "repvgg": lambda: repvgg_block(b, x, c, c),
        "repvgg-neg": lambda: b.add(k3(), conv((1, 3), (0, 1, 0, 1))),            # an asymmetric branch: not RepVGG
        "yolo_repconv": lambda: repvgg_block(b, x, c, c, group=2),
        "yolo_repconv-neg": lambda: repvgg_block(b, x, c, c, group=1),
        "acb": lambda: b.add(k3(), conv((1, 3), (0, 1, 0, 1)), conv((3, 1), (1, 0, 1, 0))),
        "acb-neg": lambda: b.add(k3(), conv((1, 3), (0, 1, 0, 1)), conv((1, 3), (0, 1, 0, 1))),
        "mobileone_dw": lambda: b.add(k3(c), k3(c), k1(c), b.bn(x, c)),
        "mobileone_dw-neg": lambda: b.add(k3(2), k3(2), k1(2), b.bn(x, c)),
        "mobileone_pw": lambda: b.add(k1(), k1(), k1(), b.bn(x, c)),
        "mobileone_pw-neg": lambda: b.add(k1(c), k1(c), b.bn(x, c)),
        "replknet": lambda: b.add(_dw(b, x, c, 9), _dw(b, x, c, 3)),
        "replknet-neg": lambda: b.add(_dw(b, x, c, 5), _dw(b, x, c, 3)),
        "qarepvgg": lambda: b.bn(b.add(k3(), b.conv(x, c, c, (1, 1), bias=False), x), c),
        "qarepvgg-neg": lambda: b.add(k3(), b.conv(x, c, c, (1, 1), bias=False), x),
        "conv_bn": lambda: k3(),
        "conv_bn-neg": lambda: b.conv(x, c, c, (3, 3), pads=(1,) * 4),
        # DBB: k×k + 1×1 + 1×1→k×k (zero-bias intermediate: zero padding is its value) + 1×1→AvgPool
        "dbb": lambda: b.add(k3(), k1(), b.bn(b.conv(b.conv(x, c, c, (1, 1), bias=False), c, c, (3, 3),
                                                     pads=(1,) * 4, bias=False), c),
                             b.bn(b.node("AveragePool", [b.conv(x, c, c, (1, 1), bias=False)], kernel_shape=[3, 3],
                                         pads=[1] * 4, count_include_pad=1), c)),
        "dbb-neg": lambda: b.add(k3(), k1()),
        "prebn": lambda: b.conv(b.bn(x, c), c, c, (1, 1)),
        "prebn-neg": lambda: b.conv(b.node("Relu", [b.bn(x, c)]), c, c, (1, 1)),
        # four dense 3×3 branches: MobileOne's stem, which no named rule takes
        "generic": lambda: b.add(k3(), k3(), k3(), k3(), k1(), b.bn(x, c)),
        "generic-neg": lambda: b.add(k3(), b.conv(b.node("Relu", [x]), c, c, (1, 1))),
    }[kind]()
    return b.model(y), y


RULE_NAMES = sorted(r.name for r in load_rules())


def test_every_rule_file_has_cases():
    assert RULE_NAMES == sorted({"repvgg", "yolo_repconv", "acb", "mobileone_dw", "mobileone_pw", "replknet",
                                 "qarepvgg", "conv_bn", "dbb", "prebn", "generic"})


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_positive_case(rule):
    model, out = _block(rule)
    result = fuse_and_check(model, {"Conv": 1, "Add": 0, "BatchNormalization": 0})
    assert [b.rule for b in result.report.fused if b.output == out] == [rule]
    (conv,) = [n for n in result.model.graph.node if n.op_type == "Conv"]   # provenance on the node
    assert [(p.key, p.value) for p in conv.metadata_props] == [("reparam_onnx.rule", rule)]


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_negative_case(rule):
    model, out = _block(rule + "-neg")
    result = fuse_with_report(model)
    assert rule not in [b.rule for b in result.report.blocks if b.output == out]


def test_rules_are_ordered_by_priority():
    rules = load_rules()
    assert [r.priority for r in rules] == sorted((r.priority for r in rules), reverse=True)


def _write(folder, name, text):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))


MINIMAL = """
    name = "{name}"
    summary = "test"
    priority = {priority}
    [[terms]]
    kind = "conv"
    count = [1, 4]
    [[terms]]
    kind = "identity"
    count = [0, 1]
"""


def test_user_rule_folder_takes_priority(tmp_path):
    _write(tmp_path / "r", "mine.toml", MINIMAL.format(name="mine", priority=1000))
    b = Builder()
    x = b.input([1, 4, 9, 9])
    result = fuse_and_check(b.model(repvgg_block(b, x, 4, 4)), {"Conv": 1}, rules=[str(tmp_path / "r")])
    assert result.report.fused[0].rule == "mine"


def test_user_rules_alone_without_builtin(tmp_path):
    _write(tmp_path / "r", "mine.toml", MINIMAL.format(name="mine", priority=0))
    b = Builder()
    x = b.input([1, 4, 9, 9])
    model = b.model(b.add(b.conv(x, 4, 4, (3, 3), pads=(1,) * 4), b.conv(x, 4, 4, (1, 3), pads=(0, 1, 0, 1))))
    result = fuse_with_report(model, rules=[str(tmp_path / "r")], builtin_rules=False)
    assert [b.rule for b in result.report.fused] == ["mine"]


def test_duplicate_rule_names_are_an_error(tmp_path):
    _write(tmp_path / "r", "a.toml", MINIMAL.format(name="repvgg", priority=1))
    with pytest.raises(InputError, match="defined twice"):
        fuse_with_report(_block("repvgg")[0], rules=[str(tmp_path / "r")])


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nsummary = "s"\nbogus = 1\n[[terms]]\nkind = "conv"', "unknown key"),
    ('name = "x"\nsummary = "s"\n[[terms]]\nkind = "maxpool"', "kind"),
    ('name = "x"\nsummary = "s"\n[[terms]]\nkind = "conv"\nkernel = "3x3"', "kernel"),
    ('name = "x"\nsummary = "s"\n[[terms]]\nkind = "conv"\ncount = [2, 1]', "count"),
    ('name = "x"\nsummary = "s"\n[[terms]]\nkind = "identity"\nkernel = "1x1"', "conv, chain, avgpool terms only"),
    ('name = "x"\nsummary = "s"\n[[terms]]\nkind = "conv"\nwidth = 3', "unknown key"),
    ('name = "x"\nsummary = "s"\npost = ["relu"]\n[[terms]]\nkind = "conv"', "post"),
    ('name = "x"\nsummary = "s"\ngroups = "some"\n[[terms]]\nkind = "conv"', "groups"),
    ('name = "x"\nsummary = "s"\npriority = "high"\n[[terms]]\nkind = "conv"', "priority"),
    ('summary = "s"\n[[terms]]\nkind = "conv"', "missing key 'name'"),
    ('name = "x"\nsummary = "s"\nterms = []', "terms"),
    ('name = "two words"\nsummary = "s"\n[[terms]]\nkind = "conv"', "name"),
])
def test_invalid_rule_files(text, message):
    import tomllib
    with pytest.raises(RuleError, match=message):
        parse_rule(tomllib.loads(text), "bad.toml")


def test_invalid_toml_and_missing_folder(tmp_path):
    _write(tmp_path / "r", "bad.toml", "name = ")
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules([str(tmp_path / "r")])
    with pytest.raises(RuleError, match="does not exist"):
        load_rules([str(tmp_path / "missing")])


def test_builtin_rules_found_from_checkout():
    from reparam_onnx.rulebook import builtin_rules_dir
    assert builtin_rules_dir() in (ROOT / "rules", ROOT / "reparam_onnx" / "rules")
