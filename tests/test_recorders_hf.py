"""recorders.hf on real Hugging Face `generate` with a GPT-2 built from a config (no hub): one
sample per sequence of a left-padded batch, KV cache vs full recompute diffed as equivalent,
teacher forcing, scores masked to -inf, sampling, tokenizer pieces, refused beam search."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="recorders.hf needs transformers (pip install 'steptrace[hf]')")

from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

from steptrace import differ
from steptrace.recorders.errors import RecorderUsageError, ReferenceNotFoundError
from steptrace.recorders.hf import GenerateRecorder, GenerationModeError, record_generate
from steptrace.tracefmt import TraceReader

V = 96
EOS = 24  # sample 1 says it at step 0, sample 0 at step 3, sample 2 never (12 steps)
PROMPTS = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11], [0, 0, 12, 13]])
MASK = (torch.arange(4)[None] >= torch.tensor([[0], [1], [2]])).long()  # left padding


def gpt2(seed: int = 0, *, eos: int = EOS, bias: dict[int, float] | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=eos,
                     pad_token_id=0, tie_word_embeddings=False, initializer_range=0.3)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for tok, b in (bias or {}).items():
            model.lm_head.weight[tok] += b * model.lm_head.weight[tok].sign()  # a deliberately different model
    return model


def rows(path, *cols):
    t = TraceReader(path).decisions(columns=["sample", "step", *cols]).to_pylist()
    return sorted(t, key=lambda r: (r["sample"], r["step"]))


def generated(output, row: int, eos: int = EOS) -> list[int]:
    """The new tokens of one row, up to and including its first EOS."""
    toks = output[row, PROMPTS.shape[1]:].tolist()
    return toks[: toks.index(eos) + 1] if eos in toks else toks


def test_kv_cache_and_full_recompute_are_equivalent_for_every_sample(tmp_path):
    model = gpt2()
    outs = {}
    for use_cache in (True, False):
        rec = record_generate(model, tmp_path / f"cache_{use_cache}.trace", input_ids=PROMPTS, attention_mask=MASK,
                              max_new_tokens=12, do_sample=False, use_cache=use_cache)
        outs[use_cache] = rec.output
        assert rec.samples == ["0", "1", "2"] and rec.summary.decisions == 4 + 1 + 12
    assert torch.equal(outs[True], outs[False])
    chosen = rows(tmp_path / "cache_True.trace", "chosen", "forced")
    for i in range(3):  # each row is its own sample, recorded up to and including its EOS
        assert [r["chosen"] for r in chosen if r["sample"] == str(i)] == generated(outs[True], i)
    assert [len(generated(outs[True], i)) for i in range(3)] == [4, 1, 12] and not any(r["forced"] for r in chosen)
    report = differ.diff(tmp_path / "cache_True.trace", [tmp_path / "cache_False.trace"])
    per_sample = {s.sample: s for s in report.worst.per_sample}
    assert sorted(per_sample) == ["0", "1", "2"]
    assert all(s.verdict in ("identical", "equivalent") and s.identical_sequence for s in per_sample.values())
    assert report.verdict in ("identical", "equivalent") and not report.mismatch
    meta = TraceReader(tmp_path / "cache_False.trace").metadata
    assert meta.watched == {"eos": EOS} and meta.runtime == "torch"
    assert '"use_cache": false' in meta.tags["transformers.generate"] and meta.tags["transformers.model_type"] == "gpt2"
    eos_rank = rows(tmp_path / "cache_True.trace", "watched")
    assert all(r["watched"][0]["id"] == EOS for r in eos_rank)
    assert [r["watched"][0]["rank"] for r in eos_rank if r["sample"] == "1"] == [0]  # EOS chosen: rank 0


def test_teacher_forcing_keeps_a_different_model_on_the_reference_tokens(tmp_path):
    ref = record_generate(gpt2(), tmp_path / "ref.trace", input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=8)
    cand = gpt2(bias={40: 3.0})
    free = record_generate(cand, tmp_path / "free.trace", input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=8)
    assert not torch.equal(free.output, ref.output)  # left alone, the candidate decodes otherwise
    forced = record_generate(cand, tmp_path / "forced.trace", input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=8,
                             recorder_options={"reference": tmp_path / "ref.trace"})
    assert torch.equal(forced.output, ref.output)  # generate took the reference's tokens (masked scores)
    got = rows(tmp_path / "forced.trace", "chosen", "argmax", "forced")
    want = rows(tmp_path / "ref.trace", "chosen")
    assert [(r["sample"], r["step"], r["chosen"]) for r in got] == [(r["sample"], r["step"], r["chosen"]) for r in want]
    assert all(r["forced"] for r in got)
    assert any(r["argmax"] != r["chosen"] for r in got)  # the candidate's own argmax is recorded
    assert {r["argmax"] for r in got} >= {40}
    with pytest.raises(ReferenceNotFoundError, match="records steps 0..7"):
        record_generate(cand, tmp_path / "long.trace", input_ids=PROMPTS[2:], attention_mask=MASK[2:],
                        max_new_tokens=9, samples=["2"], recorder_options={"reference": tmp_path / "ref.trace"})
    assert TraceReader(tmp_path / "long.trace").parts[0].complete  # closed on the error


class KeepOnly(LogitsProcessor):
    """Masks every score to -inf but ``keep`` (one id at step 1, three ids otherwise)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self, input_ids, scores):
        keep = [5] if input_ids.shape[1] - self.start == 1 else [5, 6, 7]
        out = torch.full_like(scores, float("-inf"))
        out[:, keep] = scores[:, keep]
        return out


def test_scores_masked_to_minus_inf_follow_the_spec(tmp_path):
    rec = record_generate(gpt2(), tmp_path / "m.trace", input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=3,
                          logits_processor=LogitsProcessorList([KeepOnly(PROMPTS.shape[1])]))
    for r in rows(tmp_path / "m.trace", "chosen", "topk_ids", "topk_logits", "margin", "logsumexp", "watched"):
        finite = [x for x in r["topk_logits"] if math.isfinite(x)]
        assert set(r["topk_ids"][: len(finite)]) <= {5, 6, 7} and r["chosen"] in {5, 6, 7}
        assert r["topk_logits"][len(finite):] == [-math.inf] * (8 - len(finite))
        assert r["topk_ids"][len(finite):] == sorted(r["topk_ids"][len(finite):])  # -inf ties by smaller id
        eos = r["watched"][0]
        assert eos["logit"] == -math.inf and eos["rank"] == EOS  # after the finite ids, -inf ties by id
        if r["step"] == 1:  # one finite score: margin +inf, logsumexp = that score
            assert len(finite) == 1 and r["margin"] == math.inf and r["logsumexp"] == pytest.approx(finite[0])
        else:
            assert len(finite) == 3 and math.isfinite(r["margin"])
    assert rec.output[:, -3:].tolist() == [[r["chosen"] for r in rows(tmp_path / "m.trace", "chosen")
                                            if r["sample"] == str(i)] for i in range(3)]


def test_sampling_records_the_sampled_token(tmp_path):
    torch.manual_seed(7)
    rec = record_generate(gpt2(eos=V - 1), tmp_path / "s.trace", input_ids=PROMPTS, attention_mask=MASK,
                          max_new_tokens=10, do_sample=True, top_k=5, temperature=2.0, num_return_sequences=2,
                          prefix="s")
    assert rec.samples == [f"s{i}" for i in range(6)]
    got = rows(tmp_path / "s.trace", "chosen", "argmax", "topk_ids")
    for i in range(6):
        assert [r["chosen"] for r in got if r["sample"] == f"s{i}"] == rec.output[i, 4:].tolist()
    assert any(r["chosen"] != r["argmax"] for r in got)  # sampled, not greedy
    # the sampling warpers (temperature, top-k) run after the recorded processors: the recorded
    # scores are the model's, and every sampled token is among their top 5
    assert all(r["chosen"] in r["topk_ids"][:5] for r in got)


def test_tokenizer_pieces_and_the_processor_api(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, StoppingCriteriaList

    tk = Tokenizer(WordLevel({f"w{i}": i for i in range(V)}, unk_token="w1"))
    tk.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w1", pad_token="w0", eos_token=f"w{EOS}")
    model = gpt2()
    ids = tokenizer(["w5 w6 w7 w8"], return_tensors="pt")["input_ids"]
    with GenerateRecorder(tmp_path / "p.trace", model, tokenizer=tokenizer, prefix="utt") as rec:
        first = rec.generate(input_ids=ids, max_new_tokens=5)
        proc, crit = rec.processors(samples=["by-hand"])  # generate called directly, criteria included
        assert isinstance(proc, LogitsProcessorList) and isinstance(crit, StoppingCriteriaList)
        second = model.generate(input_ids=ids, max_new_tokens=5, logits_processor=proc, stopping_criteria=crit)
        proc3, _ = rec.processors(samples=["no-criteria"])  # last step written at close (greedy: exact)
        model.generate(input_ids=ids, max_new_tokens=5, logits_processor=LogitsProcessorList([*proc3]))
    got = rows(tmp_path / "p.trace", "chosen", "piece")
    for sample in ("utt0", "by-hand", "no-criteria"):
        mine = [r for r in got if r["sample"] == sample]
        assert [r["chosen"] for r in mine] == first[0, 4:].tolist() == second[0, 4:].tolist()
        assert [r["piece"] for r in mine] == [tokenizer.decode([r["chosen"]]) for r in mine]
    assert TraceReader(tmp_path / "p.trace").vocab[:3] == ["w0", "w1", "w2"]


def test_beam_search_and_wrong_sample_lists_are_refused(tmp_path):
    model = gpt2()
    with pytest.raises(GenerationModeError, match=r"beam search \(num_beams=3\)"):
        record_generate(model, tmp_path / "b.trace", input_ids=PROMPTS, attention_mask=MASK, num_beams=3,
                        max_new_tokens=2)
    assert not (tmp_path / "b.trace").exists()  # refused before the trace is created
    with pytest.raises(RecorderUsageError, match="3 rows for 2 samples"):
        record_generate(model, tmp_path / "c.trace", input_ids=PROMPTS, attention_mask=MASK, samples=["a", "b"],
                        max_new_tokens=2)
    with pytest.raises(RecorderUsageError, match="distinct"):
        record_generate(model, tmp_path / "d.trace", input_ids=PROMPTS, samples=["a", "a", "b"], max_new_tokens=2)


def test_gpt2_cache_example_runs_in_one_command(tmp_path):
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, str(root / "examples" / "hf_gpt2_cache.py"), "--out", str(tmp_path),
                          "--layers", "1", "--batch", "2", "--new-tokens", "6"],
                         cwd=root, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    assert "atol=0.0001: equivalent" in res.stdout or "atol=0.0001: identical" in res.stdout
    for name in ("cache", "recompute"):
        r = TraceReader(tmp_path / f"{name}.trace")
        assert r.samples() == ["prompt-0", "prompt-1"] and "logits:token" in r.tensor_names()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine; the device tool was not lent to this task")
def test_cuda_generate_is_decided_on_the_device_and_forced_there(tmp_path):
    cpu = record_generate(gpt2(), tmp_path / "cpu.trace", input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=6)
    model = gpt2().cuda()
    gpu = record_generate(model, tmp_path / "gpu.trace", input_ids=PROMPTS.cuda(), attention_mask=MASK.cuda(),
                          max_new_tokens=6, recorder_options={"reference": tmp_path / "cpu.trace",
                                                              "policy": {"logits:token": "full"}})
    assert torch.equal(gpu.output.cpu(), cpu.output)
    got = rows(tmp_path / "gpu.trace", "chosen", "forced")
    assert [r["chosen"] for r in got] == [r["chosen"] for r in rows(tmp_path / "cpu.trace", "chosen")]
    assert all(r["forced"] for r in got)
    assert TraceReader(tmp_path / "gpu.trace").metadata.device.startswith("cuda")


class ForceTokens(LogitsProcessor):
    """A user's processor that makes generate say ``tokens``, one per step."""

    def __init__(self, tokens: list[int], start: int) -> None:
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        out = torch.full_like(scores, -float("inf"))
        out[:, self.tokens[min(t, len(self.tokens) - 1)]] = 0.0
        return out


def byte_fallback_tokenizer():
    """A byte-fallback BPE tokenizer built in code: <0x00>..<0xFF>, then a few words."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for w in ("</s>", "a", "hi"):
        vocab[w] = len(vocab)
    tk = Tokenizer(BPE(vocab, [], byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")


def test_processors_pass_as_they_are_with_the_users_own(tmp_path):
    model = gpt2()
    with GenerateRecorder(tmp_path / "p.trace", model) as rec:
        procs, crits = rec.processors(samples=["s"])
        out = model.generate(input_ids=PROMPTS[:1], max_new_tokens=3, do_sample=False,
                             logits_processor=LogitsProcessorList([ForceTokens([7, 8, 9], 4), *procs]),
                             stopping_criteria=crits)
    assert out[0, 4:].tolist() == [7, 8, 9]
    assert [r["chosen"] for r in rows(tmp_path / "p.trace", "chosen")] == [7, 8, 9]


def test_byte_fallback_pieces_are_merged_into_their_character(tmp_path):
    tok = byte_fallback_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32, eos_token_id=256,
                     pad_token_id=256, bos_token_id=256)
    model = GPT2LMHeadModel(cfg).eval()
    says = [257, 0xE7, 0xAF, 0x87, 258, 0xC3, 0xA9]  # a 篇 hi é
    assert tok.decode(says) == "a篇hié"
    with GenerateRecorder(tmp_path / "b.trace", model, tokenizer=tok) as rec:
        rec.generate(input_ids=torch.tensor([[257]]), max_new_tokens=len(says), do_sample=False,
                     logits_processor=LogitsProcessorList([ForceTokens(says, 1)]))
    got = rows(tmp_path / "b.trace", "chosen", "piece")
    assert [r["chosen"] for r in got] == says
    assert [r["piece"] for r in got] == ["a", "<0xE7>", "<0xAF>", "篇", "hi", "<0xC3>", "é"]
    vocab = TraceReader(tmp_path / "b.trace").vocab
    assert vocab[0xE7] == "<0xE7>" and vocab[0x41] == "A" and vocab[257] == "a"  # no '\ufffd' in the vocabulary
