"""Which ops of a LiteRT file run outside LiteRT's XNNPACK delegate on this CPU, by op type.

    python benchmarks/litert_partitions.py runs/demo/classify/model.int8.tflite [more.tflite ...]

The interpreter appends one DELEGATE node per XNNPACK partition to the graph; the ops it replaced stay
listed. Walking back from the outputs, a tensor comes from the DELEGATE node that outputs it, else from
its own op: the ops reached that way are the ones LiteRT runs on its builtin kernels, each a boundary
where the graph leaves XNNPACK.
"""
from __future__ import annotations

import argparse
import collections
import json

DELEGATE = "DELEGATE"


def partitions(path: str, threads: int = 1) -> dict:
    """{"partitions": XNNPACK partitions, "ops": {op: count in the file}, "outside": {op: count run outside}}."""
    from ai_edge_litert import interpreter as interpreter_lib
    interpreter = interpreter_lib.Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # every node: the file's ops, then the delegate's
    producer = {int(t): op["index"] for op in ops for t in op["outputs"]}  # a DELEGATE node, listed later, wins
    reached, stack = set(), [int(d["index"]) for d in interpreter.get_output_details()]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node in reached:
            continue
        reached.add(node)
        stack += [int(t) for t in ops[node]["inputs"] if t >= 0]
    count = collections.Counter(op["op_name"] for op in ops)
    outside = collections.Counter(ops[n]["op_name"] for n in reached if ops[n]["op_name"] != DELEGATE)
    return {"partitions": count.pop(DELEGATE, 0), "ops": dict(count.most_common()),
            "outside": dict(outside.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()
    for path in args.files:
        found = partitions(path)
        if args.json:
            print(json.dumps({"file": path, **found}))
            continue
        outside = found["outside"]
        print(f"{path}: {found['partitions']} XNNPACK partitions; {sum(outside.values())} of "
              f"{sum(found['ops'].values())} ops outside XNNPACK")
        for name, n in outside.items():
            print(f"  {name:20s} {n:4d} of {found['ops'][name]}")


if __name__ == "__main__":
    main()
