"""reparam-onnx next to the general ONNX optimizers, on one fixture: what each one leaves.

For every tool that is installed (onnxsim, onnxslim, onnxoptimizer, onnxruntime's offline
optimizer at each level, polygraphy's constant folding as in `polygraphy surgeon sanitize
--fold-constants`) and for reparam-onnx: the node count, the convolutions (Conv and
onnxruntime's FusedConv), Add and BatchNormalization nodes, and whether the parallel
branches were merged: one convolution per block, and `reparam-onnx --check` on the tool's
output finds no fusable block left (not judged on outputs with contrib ops, which
reparam-onnx does not read). Every tool runs with its defaults.

    python benchmarks/compare_tools.py [MODEL.onnx]      # default: the README's fixture

The README's "Compared with" table is this script's output (tests/test_compare.py checks
it against the tools installed).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reparam_onnx import fuse_with_report  # noqa: E402

FIXTURE = ROOT / "fixtures" / "torch" / "repvgg_a0_small.ts_nocf.onnx"
CONVS = ("Conv", "FusedConv")


@dataclass
class Row:
    tool: str
    version: str
    nodes: int
    convs: int
    adds: int
    bns: int
    left: Optional[int]     # fusable blocks reparam-onnx --check still finds (None: contrib ops, not judged)
    merged: bool

    def markdown(self) -> str:
        left = "n/a (contrib ops)" if self.left is None else str(self.left)
        name = f"{self.tool} {self.version}" if self.version else self.tool
        return (f"| {name} | {self.nodes} | {self.convs} | {self.adds} | {self.bns} | "
                f"{left} | {'yes' if self.merged else 'no'} |")


HEADER = ["| tool | nodes | convolutions | Add | BatchNormalization | fusable blocks left | branches merged |",
          "|---|---|---|---|---|---|---|"]


def onnxsim_(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim
    simplified, ok = onnxsim.simplify(model)
    assert ok, "onnxsim's own check failed"
    return simplified


def onnxslim_(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim
    return onnxslim.slim(model)


def onnxoptimizer_(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer
    return onnxoptimizer.optimize(model)


def onnxruntime_(level: str) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
        with tempfile.TemporaryDirectory() as folder:
            options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load(options.optimized_model_filepath)
    return optimize


def polygraphy_(model: onnx.ModelProto) -> onnx.ModelProto:
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.ERROR
    return fold_constants(model)


def reparam_onnx_(model: onnx.ModelProto) -> onnx.ModelProto:
    return fuse_with_report(model).model


# (row label, distribution whose version is shown, how to run it)
TOOLS = [
    ("onnxsim", "onnxsim", onnxsim_),
    ("onnxslim", "onnxslim", onnxslim_),
    ("onnxoptimizer", "onnxoptimizer", onnxoptimizer_),
    ("onnxruntime basic", "onnxruntime", onnxruntime_("basic")),
    ("onnxruntime extended", "onnxruntime", onnxruntime_("extended")),
    ("onnxruntime all", "onnxruntime", onnxruntime_("all")),
    ("polygraphy", "polygraphy", polygraphy_),
    ("reparam-onnx", "reparam-onnx", reparam_onnx_),
]


def installed(distribution: str) -> Optional[str]:
    """The installed version of a distribution (reparam-onnx: this checkout's), or None."""
    if distribution == "reparam-onnx":
        from reparam_onnx import __version__
        return __version__
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def fusable(model: onnx.ModelProto) -> int:
    """What `reparam-onnx --check` counts: blocks it would fuse."""
    return sum(b.fusable for b in fuse_with_report(model, verify=False, write=False).report.blocks)


def row(label: str, version: str, model: onnx.ModelProto, blocks: int) -> Row:
    ops = Counter(n.op_type for n in model.graph.node)
    contrib = any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    left = None if contrib else fusable(model)
    convs = sum(ops[op] for op in CONVS)
    return Row(label, version, len(model.graph.node), convs, ops["Add"], ops["BatchNormalization"], left,
               merged=convs == blocks and left in (0, None) and not contrib)


def measure(path: Path = FIXTURE, only: Optional[List[str]] = None) -> Dict[str, Row]:
    """Each installed tool's row (and the input's, as 'input'), by label."""
    model = onnx.load(str(path))
    blocks = fusable(model)
    rows = {"input": row(f"input ({path.name})", "", model, blocks)}
    for label, distribution, run in TOOLS:
        version = installed(distribution)
        if version is None or only is not None and label not in only:
            continue
        with contextlib.redirect_stdout(io.StringIO()):   # the tools' own chatter
            rows[label] = row(label, version, run(model), blocks)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=FIXTURE)
    args = parser.parse_args()
    rows = measure(args.model)
    missing = [label for label, distribution, _ in TOOLS if installed(distribution) is None]
    print("\n".join(HEADER + [r.markdown() for r in rows.values()]))
    if missing:
        print(f"\nnot installed: {', '.join(missing)}")


if __name__ == "__main__":
    main()
