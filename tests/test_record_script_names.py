"""`trace record` on a script shaped like a real inference loop: an encoder and a decoder called
as two roots, several utterances decoded in a loop. Names are ROOT.path whatever the call
order; --sample-per starts one sample per encoder call with ids that line up between a
reference and a candidate run; globs that match nothing and runs that record nothing exit 2
with the names seen and close matches; probabilities given as --logits are noticed, and
--scores prob decides their logarithm."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from steptrace.tracefmt import TraceReader
from steptrace.tui.cli import EXIT_ERROR, EXIT_MISMATCH, main

ASR_SCRIPT = textwrap.dedent('''
    """Encode each utterance, then decode greedily from its summary: knows nothing of steptrace."""
    import argparse

    import torch
    from torch import nn


    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16)
            self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

        def forward(self, frames):
            x = torch.tanh(self.proj(frames))
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x.mean(dim=1)


    class Decoder(nn.Module):
        def __init__(self, vocab=32, bias=0.0):
            super().__init__()
            self.emb = nn.Embedding(vocab, 16)
            self.rnn = nn.GRU(16, 16, batch_first=True)
            self.head = nn.Linear(16, vocab)
            self.softmax_out = nn.Softmax(dim=-1)
            with torch.no_grad():
                self.head.weight.mul_(4.0)
                self.head.bias[5] += bias

        def forward(self, token, h):
            out, h = self.rnn(self.emb(token.view(1, 1)), h)
            logits = self.head(out[:, -1])
            return self.softmax_out(logits), h


    def main():
        ap = argparse.ArgumentParser()
        ap.add_argument("--utterances", type=int, default=3)
        ap.add_argument("--steps", type=int, default=4)
        ap.add_argument("--bias", type=float, default=0.0)
        ap.add_argument("--warmup-decoder", action="store_true", help="call the decoder once before the encoder")
        ap.add_argument("--sample-probs", action="store_true", help="sample from the probabilities")
        a = ap.parse_args()
        torch.manual_seed(0)
        enc, dec = Encoder(), Decoder(bias=a.bias)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            if a.warmup_decoder:
                dec(torch.tensor([0]), torch.zeros(1, 1, 16))
            for u in range(a.utterances):
                frames = torch.randn(1, 5 + u, 8, generator=gen)
                h = enc(frames).view(1, 1, 16).contiguous()
                tok = 1
                for _ in range(a.steps):
                    probs, h = dec(torch.tensor([tok]), h)
                    if a.sample_probs:
                        tok = int(torch.multinomial(probs[0], 1))
                    else:
                        tok = int(probs[0].argmax())
                    print(tok, flush=True)


    if __name__ == "__main__":
        main()
''')


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("asr") / "asr.py"
    path.write_text(ASR_SCRIPT)
    return path


def record(*argv: str) -> int:
    return main(["record", *argv])


def names(path: Path) -> list[str]:
    return list(dict.fromkeys(TraceReader(path).tensors(columns=["name"])["name"].to_pylist()))


def decisions(path: Path) -> list[dict]:
    rows = TraceReader(path).decisions(columns=["sample", "step", "chosen", "margin"]).to_pylist()
    return sorted(rows, key=lambda r: (r["sample"], r["step"]))


# ---------------------------------------------------------------------- names
def test_names_are_root_prefixed_whatever_the_call_order(asr, tmp_path, capsys):
    a, b = tmp_path / "a.trace", tmp_path / "b.trace"
    assert record("-o", str(a), "--modules", "*", "--logits", "head", str(asr), "--utterances", "1") == 0
    assert record("-o", str(b), "--modules", "*", "--logits", "head", str(asr), "--utterances", "1",
                  "--warmup-decoder") == 0
    assert sorted(names(a)) == sorted(names(b))
    assert {"Encoder", "Encoder.proj", "Encoder.layers.0", "Encoder.layers.1", "Decoder.emb", "Decoder.rnn.0",
            "Decoder.rnn.1", "Decoder.head", "Decoder.softmax_out", "Decoder.0", "Decoder.1",
            "logits:token"} == set(names(a))
    # --modules 'Encoder.*' selects the encoder's modules in either order
    for order in ([], ["--warmup-decoder"]):
        out = tmp_path / f"enc{len(order)}.trace"
        assert record("-o", str(out), "--modules", "Encoder.*", "--logits", "Decoder.head", str(asr),
                      "--utterances", "1", *order) == 0
        assert set(names(out)) == {"Encoder.proj", "Encoder.layers.0", "Encoder.layers.1"}


def test_a_second_root_of_one_class_gets_a_numbered_label(tmp_path, capsys):
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        torch.manual_seed(0)
        a, b = nn.Linear(4, 6), nn.Linear(4, 6)
        x = torch.randn(1, 4)
        with torch.no_grad():
            for _ in range(2):
                a(x)
                b(x)
    '''))
    assert record("-o", str(tmp_path / "t.trace"), "--modules", "*", "--logits", "Linear#1", str(script)) == 0
    assert names(tmp_path / "t.trace") == ["Linear", "Linear#1", "logits:token"]
    assert len(decisions(tmp_path / "t.trace")) == 2  # each call of the second root is a step


# ---------------------------------------------------------------------- silent no-ops
def test_a_logits_glob_matching_nothing_exits_2_with_a_suggestion(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "x.trace"), "--logits", "decoder", str(asr)) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--logits decoder matched no module" in err and "did you mean Decoder" in err
    assert "Encoder.layers.1" in err and "Decoder.softmax_out" in err  # every name seen (there are few)


def test_a_modules_glob_matching_nothing_exits_2(asr, tmp_path, capsys):
    code = record("-o", str(tmp_path / "x.trace"), "--modules", "encoder.*", "--logits", "head", str(asr))
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--modules encoder.* matched no module or ONNX value" in err and "did you mean" in err
    assert len(decisions(tmp_path / "x.trace")) == 12  # the trace is kept


def test_the_decided_vector_counts_as_a_modules_match(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "x.trace"), "--modules", "logits:*", "--logits", "head", str(asr)) == 0
    assert names(tmp_path / "x.trace") == ["logits:token"]


def test_a_partly_matching_logits_list_still_names_the_glob_that_missed(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "x.trace"), "--logits", "head,lm_head", str(asr)) == EXIT_ERROR
    assert "--logits lm_head matched no" in capsys.readouterr().err


def test_no_logits_and_nothing_recorded_exits_2(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "x.trace"), str(asr)) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "nothing was recorded" in err and "give --logits MODULE" in err and "Decoder.head" in err


def test_many_names_are_counted_with_close_matches(tmp_path, capsys):
    script = tmp_path / "wide.py"
    script.write_text(textwrap.dedent('''
        import torch
        from torch import nn
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(60)])
        with torch.no_grad():
            model(torch.zeros(1, 4))
    '''))
    assert record("-o", str(tmp_path / "x.trace"), "--logits", "58", str(script)) == 0  # the relative path
    assert record("-o", str(tmp_path / "y.trace"), "--logits", "Sequential.6O", str(script)) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "61 names seen, the first 40" in err and "…" in err and "did you mean Sequential.60" not in err
    assert "did you mean" in err and "Sequential.6" in err


# ---------------------------------------------------------------------- samples
def test_sample_per_starts_a_sample_at_each_encoder_call(asr, tmp_path, capsys):
    out = tmp_path / "s.trace"
    assert record("-o", str(out), "--logits", "head", "--sample-per", "Encoder", str(asr), "--utterances", "3") == 0
    rows = decisions(out)
    assert [(r["sample"], r["step"]) for r in rows] == [(s, t) for s in "012" for t in range(4)]
    assert [r["chosen"] for r in rows] == [int(x) for x in capsys.readouterr().out.split()]


def test_sample_ids_from_a_file_line_up_between_reference_and_candidate(asr, tmp_path, capsys):
    ids = tmp_path / "utts.txt"
    ids.write_text("utt-a\nutt-b\n\nutt-c\n")
    common = ["--logits", "head", "--modules", "Encoder.*", "--sample-per", "Encoder", "--sample-from", str(ids)]
    assert record("-o", str(tmp_path / "ref.trace"), *common, str(asr)) == 0
    assert record("-o", str(tmp_path / "cand.trace"), *common, str(asr), "--warmup-decoder", "--bias", "9") == 0
    for trace in ("ref.trace", "cand.trace"):
        assert TraceReader(tmp_path / trace).samples() == ["utt-a", "utt-b", "utt-c"]
    err = capsys.readouterr().err
    assert "calls before the first --sample-per call were not recorded (they belong to no sample): 1 of Decoder" in (
        " ".join(err.split()))  # the candidate's warm-up call
    assert main(["diff", str(tmp_path / "ref.trace"), str(tmp_path / "cand.trace")]) == EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "utt-a" in out and "ended early" not in out
    ref_tokens = [r["chosen"] for r in decisions(tmp_path / "ref.trace")]
    assert record("-o", str(tmp_path / "forced.trace"), *common, "--teacher", str(tmp_path / "ref.trace"), str(asr),
                  "--warmup-decoder", "--bias", "9") == 0  # each sample forced by the reference's same-id sample
    assert [r["chosen"] for r in decisions(tmp_path / "forced.trace")] == ref_tokens
    capsys.readouterr()
    # more encoder calls than ids: exit 2, the trace kept and closed
    assert record("-o", str(tmp_path / "more.trace"), *common, str(asr), "--utterances", "4") == EXIT_ERROR
    assert "called a 4th time but only 3 sample id(s)" in capsys.readouterr().err
    assert TraceReader(tmp_path / "more.trace").samples() == ["utt-a", "utt-b", "utt-c"]


def test_sample_options_that_cannot_work_exit_2(asr, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    code = record("-o", str(tmp_path / "x.trace"), "--logits", "head", "--sample-from", str(ids), str(asr))
    assert code == EXIT_ERROR
    assert "give --sample-per too" in capsys.readouterr().err
    assert record("-o", str(tmp_path / "y.trace"), "--logits", "head", "--sample-per", "Encodr", str(asr)) == EXIT_ERROR
    assert "--sample-per Encodr matched no module or ONNX model" in capsys.readouterr().err
    ids.write_text("a\nb\na\n")
    assert record("-o", str(tmp_path / "z.trace"), "--logits", "head", "--sample-per", "Encoder", "--sample-from",
                  str(ids), str(asr)) == EXIT_ERROR
    assert "sample ids must be distinct; repeated: a" in capsys.readouterr().err


# ---------------------------------------------------------------------- probabilities
def test_probabilities_as_logits_are_noticed_and_scores_prob_decides_their_log(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "p.trace"), "--logits", "softmax_out", str(asr)) == 0
    assert "Decoder.softmax_out looks like probabilities" in capsys.readouterr().err
    assert record("-o", str(tmp_path / "l.trace"), "--logits", "head", str(asr)) == 0
    capsys.readouterr()
    assert record("-o", str(tmp_path / "q.trace"), "--logits", "softmax_out", "--scores", "prob", str(asr)) == 0
    assert "looks like probabilities" not in capsys.readouterr().err
    lg, pr, raw = decisions(tmp_path / "l.trace"), decisions(tmp_path / "q.trace"), decisions(tmp_path / "p.trace")
    assert [r["chosen"] for r in lg] == [r["chosen"] for r in pr] == [r["chosen"] for r in raw]
    # log-softmax margins are logit margins; the raw probabilities' are not
    np.testing.assert_allclose([r["margin"] for r in pr], [r["margin"] for r in lg], rtol=1e-4, atol=1e-4)
    assert max(r["margin"] for r in raw) <= 1.0 < max(r["margin"] for r in lg)
    assert record("-o", str(tmp_path / "h.trace"), "--logits", "head", "--scores", "logprob", str(asr)) == 0
    assert [r["margin"] for r in decisions(tmp_path / "h.trace")] == [r["margin"] for r in lg]


def test_teacher_forcing_probabilities_gives_the_script_a_distribution(asr, tmp_path, capsys):
    assert record("-o", str(tmp_path / "ref.trace"), "--logits", "softmax_out", "--scores", "prob", str(asr)) == 0
    ref = [int(x) for x in capsys.readouterr().out.split()]
    # the candidate samples from what it receives: forced to 1 at the reference's token, 0 elsewhere
    assert record("-o", str(tmp_path / "f.trace"), "--logits", "softmax_out", "--scores", "prob", "--teacher",
                  str(tmp_path / "ref.trace"), str(asr), "--bias", "9", "--sample-probs") == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == ref


# ---------------------------------------------------------------------- ONNX Runtime sessions
ORT_ASR = textwrap.dedent('''
    """Encode each utterance with enc.onnx, decode it with dec.onnx: knows nothing of steptrace."""
    import sys

    import numpy as np
    import onnxruntime as ort

    folder, utterances, warm = sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3
    opts = ["CPUExecutionProvider"]
    dec = ort.InferenceSession(f"{folder}/dec.onnx", providers=opts)
    enc = ort.InferenceSession(f"{folder}/enc.onnx", providers=opts)
    if warm:
        dec.run(None, {"h": np.zeros((1, 16), np.float32)})
    rng = np.random.default_rng(0)
    for u in range(utterances):
        (h,) = enc.run(None, {"frames": rng.standard_normal((1, 8), dtype=np.float32)})
        for _ in range(3):
            logits, h = dec.run(None, {"h": h})
            print(int(logits[0].argmax()), flush=True)
''')


@pytest.fixture(scope="module")
def onnx_asr(tmp_path_factory) -> Path:
    import warnings

    import torch
    from torch import nn

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16)

        def forward(self, frames):
            return torch.tanh(self.proj(frames))

    class Dec(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(16, 16)
            self.head = nn.Linear(16, 24)

        def forward(self, h):
            h = torch.tanh(self.cell(h))
            return self.head(h) * 4.0, h

    d = tmp_path_factory.mktemp("onnx_asr")
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Enc().eval(), (torch.zeros(1, 8),), str(d / "enc.onnx"), dynamo=False,
                          input_names=["frames"], output_names=["h"], opset_version=17)
        torch.onnx.export(Dec().eval(), (torch.zeros(1, 16),), str(d / "dec.onnx"), dynamo=False,
                          input_names=["h"], output_names=["logits", "h_out"], opset_version=17)
    (d / "ort_asr.py").write_text(ORT_ASR)
    return d


def test_onnx_values_are_prefixed_by_their_model_and_sample_per_takes_a_model(onnx_asr, tmp_path, capsys):
    script, folder = str(onnx_asr / "ort_asr.py"), str(onnx_asr)
    assert record("-o", str(tmp_path / "a.trace"), "--modules", "*", "--logits", "logits", "--sample-per", "enc",
                  script, folder, "2") == 0
    assert record("-o", str(tmp_path / "b.trace"), "--modules", "*", "--logits", "dec.logits", "--sample-per", "enc",
                  script, folder, "2", "warm") == 0  # the decoder runs first here
    assert set(names(tmp_path / "a.trace")) == set(names(tmp_path / "b.trace")) == {
        "enc.frames", "enc.h", "dec.h", "dec.logits", "dec.h_out", "logits:token"}
    for trace in ("a.trace", "b.trace"):
        assert [(r["sample"], r["step"]) for r in decisions(tmp_path / trace)] == [
            (s, t) for s in "01" for t in range(3)]
    assert "1 of dec" in " ".join(capsys.readouterr().err.split())  # the warm-up run, not recorded
