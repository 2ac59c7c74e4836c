"""A plain greedy decoder over a chain of residual layers; it knows nothing of steptrace.

``--drift EPS`` scales layer ``--drift-layer`` (default 0) by 1 + EPS: a small, harmless drift.
``--bug-layer L --bug-from S`` plants a real bug: from decode step S on, layer L adds a large
vector to its output at the last position (the decision there flips). ``--head-bug-from S`` puts
the bug in the logits head instead.
"""
import argparse

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bug_from = None
        self.bug = None
        self.scale = 1.0

    def forward(self, x):
        y = x + torch.tanh(self.lin(x) * self.scale)
        if self.bug_from is not None and x.shape[1] >= self.bug_from:
            y = y.clone()
            y[:, -1] = y[:, -1] + self.bug
        return y


class Head(nn.Linear):
    bug_from = None

    def forward(self, x):
        logits = super().forward(x)
        if self.bug_from is not None and x.shape[1] >= self.bug_from:
            logits = logits.clone()
            logits[:, -1, -1] += 40.0
        return logits


class ChainLM(nn.Module):
    def __init__(self, layers=4, d=16, vocab=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = Head(d, vocab)

    def forward(self, tokens):
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--drift", type=float, default=0.0)
    ap.add_argument("--drift-layer", type=int, default=0)
    ap.add_argument("--bug-layer", type=int, default=None)
    ap.add_argument("--bug-from", type=int, default=None)
    ap.add_argument("--head-bug-from", type=int, default=None)
    args = ap.parse_args()
    model = ChainLM(args.layers).eval()
    prompt = [1, 2, 3]
    if args.drift:
        model.layers[args.drift_layer].scale = 1.0 + args.drift
    if args.bug_layer is not None:
        block = model.layers[args.bug_layer]
        block.bug_from = len(prompt) + args.bug_from
        block.bug = 40.0 * model.head.weight[-1].detach() / model.head.weight[-1].detach().norm()
    if args.head_bug_from is not None:
        model.head.bug_from = len(prompt) + args.head_bug_from
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(args.steps):
            logits = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    print(" ".join(map(str, tokens)))


if __name__ == "__main__":
    main()
