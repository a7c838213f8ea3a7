"""ONNX Runtime cost of the shared graph's LoRA branch: zero-rank default A/B (no adapter active) vs a fed rank-8
adapter vs no branch at all, on a stack of MatMul layers. Interleaved rounds, medians, ratios to the plain graph,
and a second plain session as the A/A control.

    python tools/bench_zero_rank.py [--layers 30] [--hidden 576] [--seq 128] [--rounds 40] [--threads 2] [--seed 0]
"""

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--hidden", type=int, default=576)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--rounds", type=int, default=40)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seed", type=int, default=0, help="Seed of the session creation order.")
args = ap.parse_args()
H, S, L = args.hidden, args.seq, args.layers
rng = np.random.default_rng(0)
# one set of weights for every graph, scaled so activations stay O(1) through the tanh stack: vanishing activations
# turn into denormals, whose slow arithmetic would time the values instead of the graph
WEIGHTS = [(rng.standard_normal((H, H), dtype=np.float32) / np.sqrt(H)).astype(np.float32) for _ in range(L)]


def build(branch: bool):
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, H])]
    cur = "x"
    for i in range(L):
        inits.append(numpy_helper.from_array(WEIGHTS[i], f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"base{i}"]))
        out = f"base{i}"
        if branch:
            a = numpy_helper.from_array(np.zeros((H, 0), np.float32), f"a{i}")
            b = numpy_helper.from_array(np.zeros((0, H), np.float32), f"b{i}")
            inits += [a, b]
            inputs += [
                helper.make_tensor_value_info(f"a{i}", TensorProto.FLOAT, [H, "r"]),
                helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, ["r", H]),
            ]
            nodes += [
                helper.make_node("MatMul", [cur, f"a{i}"], [f"xa{i}"]),
                helper.make_node("MatMul", [f"xa{i}", f"b{i}"], [f"xab{i}"]),
                helper.make_node("Add", [f"base{i}", f"xab{i}"], [f"sum{i}"]),
            ]
            out = f"sum{i}"
        nodes.append(helper.make_node("Tanh", [out], [f"h{i}"]))
        cur = f"h{i}"
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    m.ir_version = 10
    return m.SerializeToString()


so = ort.SessionOptions()
so.intra_op_num_threads = args.threads
so.log_severity_level = 3  # the graph's overridable initializers are intended
# Sessions are created in a shuffled order, with a second plain session as the A/A control: on this kind of machine
# the order in which sessions are created (where their weights land in memory) has moved latency by up to 30%.
order = ["plain", "plain-copy", "shared"]
np.random.default_rng(args.seed).shuffle(order)
sessions = {
    name: ort.InferenceSession(build(name == "shared"), so, providers=["CPUExecutionProvider"]) for name in order
}
x = rng.standard_normal((1, S, H), dtype=np.float32)
feeds8 = {"x": x}
for i in range(L):
    feeds8[f"a{i}"] = rng.standard_normal((H, 8), dtype=np.float32) * 0.02
    feeds8[f"b{i}"] = rng.standard_normal((8, H), dtype=np.float32) * 0.02
runs = {
    "plain": lambda: sessions["plain"].run(None, {"x": x}),
    "plain-copy (A/A)": lambda: sessions["plain-copy"].run(None, {"x": x}),
    "shared-zero-rank": lambda: sessions["shared"].run(None, {"x": x}),
    "shared-r8-fed": lambda: sessions["shared"].run(None, feeds8),
}
for f in runs.values():
    for _ in range(5):
        f()
times: dict[str, list[float]] = {k: [] for k in runs}
names = list(runs)
for rnd in range(args.rounds):
    for k in names[rnd % len(names) :] + names[: rnd % len(names)]:
        t = time.perf_counter()
        runs[k]()
        times[k].append(time.perf_counter() - t)
print(f"sessions created in the order {order}")
base = np.median(times["plain"])
for k, v in times.items():
    print(f"{k:18s} median {np.median(v) * 1e3:7.3f} ms  ratio {np.median(v) / base:.3f}")
