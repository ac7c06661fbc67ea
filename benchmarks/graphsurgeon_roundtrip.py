"""What an onnx-graphsurgeon import/export round trip changes, next to reparam-onnx's own edit.

reparam-onnx edits the ModelProto in place through its own graph index (graph.py). The
design named onnx-graphsurgeon for that; this script measures, on the project's fixtures,
what a round trip `gs.export_onnx(gs.import_onnx(model))` (no edit at all) changes, and
what reparam-onnx's fuse changes in the same places:

  - model metadata_props, doc_string, model_version, domain; node doc_strings and
    metadata_props (the fixture is annotated the way training pipelines do, with
    onnx.helper.set_model_props and doc strings, since the exports carry few of these);
  - value_info entries; the order of the initializers;
  - memory: the resident memory an export adds while the imported graph is alive, on a
    model with 64 MiB of untouched weights (graphsurgeon hands its TensorProtos to
    onnx.helper.make_graph, which copies them into the new graph), against what
    reparam-onnx's fuse adds when it edits the loaded model (--no-verify; with
    verification it keeps one reference copy of the input per run).

    python benchmarks/graphsurgeon_roundtrip.py

The README's "onnx-graphsurgeon" table is this script's output (tests/test_graphsurgeon.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURES = ["torch/repvgg.dynamo.onnx", "torch/repvgg_a0_small.ts_cf.onnx", "tf/keras3_nhwc_op17_opt.onnx"]


def annotated(path: Path) -> onnx.ModelProto:
    """The fixture with what a training pipeline adds: model properties and doc strings."""
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"author": "ci", "dataset": "imagenet-1k", "git_sha": "0123abc"})
    model.doc_string = "RepVGG, training form"
    model.model_version = 3
    model.domain = "ai.example.vision"
    for node in model.graph.node:
        node.doc_string = f"{node.op_type} of the training graph"
    return model


def tensors(model: onnx.ModelProto) -> set:
    g = model.graph
    return {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}


def kept(before: onnx.ModelProto, after: onnx.ModelProto) -> Dict[str, str]:
    """Each fact as 'input -> output' (model level) or 'kept K of N' over what survives in
    `after`: nodes by name, value_info by tensor, initializers by name."""
    b, a = before.graph, after.graph
    nodes = {n.name: n for n in a.node}
    both = [(n, nodes[n.name]) for n in b.node if n.name in nodes]
    live = tensors(after)
    infos = {v.name: v for v in a.value_info}
    old_infos = [v for v in b.value_info if v.name in live]
    names = [t.name for t in a.initializer]
    common = [t.name for t in b.initializer if t.name in set(names)]

    def of(k: int, n: int) -> str:
        return f"kept {k} of {n}"
    return {
        "model metadata_props": of(len([p for p in before.metadata_props if p in after.metadata_props]),
                                   len(before.metadata_props)),
        "model doc_string, model_version, domain": "kept" if (before.doc_string, before.model_version, before.domain)
        == (after.doc_string, after.model_version, after.domain) else
        f"{after.doc_string!r}, {after.model_version}, {after.domain!r}",
        "node doc_strings": of(sum(x.doc_string == y.doc_string for x, y in both if x.doc_string),
                               sum(bool(x.doc_string) for x, _ in both)),
        "node metadata_props": of(sum(list(x.metadata_props) == list(y.metadata_props) for x, y in both
                                      if x.metadata_props), sum(bool(x.metadata_props) for x, _ in both)),
        "value_info": of(sum(infos.get(v.name) == v for v in old_infos), len(old_infos)),
        "initializer order": "kept" if [n for n in names if n in set(common)] == common else "changed",
    }


def graphsurgeon(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs
    return gs.export_onnx(gs.import_onnx(model))


def reparam(model: onnx.ModelProto) -> onnx.ModelProto:
    from reparam_onnx import fuse
    return fuse(model)


def compare(fixture: str) -> List[Dict[str, Any]]:
    """Per fact: what the round trip keeps, and what reparam-onnx's fuse keeps of the nodes and
    tensors that survive it (it replaces each fused block's nodes and weights)."""
    model = annotated(ROOT / "fixtures" / fixture)
    trip, fused = kept(model, graphsurgeon(model)), kept(model, reparam(model))
    return [{"fact": key, "graphsurgeon": trip[key], "reparam-onnx": fused[key]} for key in trip]


MEMORY = textwrap.dedent("""
    import json, sys
    import numpy as np, onnx
    from onnx import helper, numpy_helper
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from conftest import Builder, repvgg_block

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    b = Builder(0)
    x = b.input([1, 8, 8, 8])
    y = b.node("Relu", [repvgg_block(b, x, 8, 8)])
    flat = b.node("Flatten", [y])
    w = b.const(np.zeros((512, 32768), np.float32) + 1.0)          # 64 MiB nobody fuses
    model = b.model(b.node("MatMul", [b.node("Slice", [flat, b.const(np.array([0]), "s"), b.const(np.array([32768]), "e"),
                                              b.const(np.array([1]), "a")]), b.node("Transpose", [w])]))
    path = sys.argv[2]
    onnx.save_model(model, path)
    del model, b
    import onnx_graphsurgeon as gs
    from reparam_onnx import fuse_with_report
    start = rss()
    if sys.argv[3] == "graphsurgeon":      # load, import, export
        graph = gs.import_onnx(onnx.load(path))
        out = gs.export_onnx(graph)
    else:                                  # load, fuse in place (reparam-onnx MODEL -o OUT --no-verify)
        result = fuse_with_report(path, verify=False)
    print(json.dumps({"added": rss() - start, "weights": 512 * 32768 * 4}))
""")


def memory(tool: str, folder: Path) -> Dict[str, int]:
    """Resident memory the tool adds, loading included, with its result alive (a fresh process;
    Linux /proc); and the bytes of the untouched weights."""
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(ROOT), str(folder / "big.onnx"), tool],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_line(tool: str, m: Dict[str, int]) -> str:
    return (f"{tool}: {m['added'] / m['weights']:.1f}x the untouched weights' bytes resident "
            f"(load included; {m['weights'] / 2**20:.0f} MiB of weights)")


def markdown(fixture: str, rows: List[Dict[str, Any]]) -> List[str]:
    lines = [f"| `{fixture}`, annotated | graphsurgeon round trip | reparam-onnx fuse (what survives) |",
             "|---|---|---|"]
    return lines + [f"| {r['fact']} | {r['graphsurgeon']} | {r['reparam-onnx']} |" for r in rows]


def main() -> None:
    import tempfile
    for fixture in FIXTURES:
        print("\n".join(markdown(fixture, compare(fixture))) + "\n")
    with tempfile.TemporaryDirectory() as folder:
        for tool in ("graphsurgeon", "reparam-onnx"):
            m = memory(tool, Path(folder))
            print(memory_line(tool, m))


if __name__ == "__main__":
    main()
