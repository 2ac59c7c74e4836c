"""A plain greedy decoder over an ONNX model (``tokens`` -> ``logits``); it knows nothing of
steptrace. Usage: triage_onnx.py MODEL.onnx [--steps N]"""
import argparse

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    tokens = [1, 2, 3]
    for _ in range(args.steps):
        (logits,) = session.run(["logits"], {"tokens": np.array([tokens], dtype=np.int64)})
        tokens.append(int(logits[0, -1].argmax()))
    print(" ".join(map(str, tokens)))


if __name__ == "__main__":
    main()
