"""`trace record`'s torch hook: ``torch.nn.Module.__call__`` wrapped by
``recorders.torchcalls.install_module_calls``. Every call runs the recorder's hooks except calls of a
module that needs nothing (not recorded, not decided, starting no sample) made inside another
module's call; steps still end at the outermost return, whichever module that is."""

from __future__ import annotations

import textwrap

import pytest
import torch

from steptrace.recorders.script import run_script
from steptrace.recorders.scripthooks import ScriptRecorder
from steptrace.recorders.torchcalls import install_module_calls
from steptrace.tracefmt import TraceReader

ORIGINAL_CALL = torch.nn.Module.__call__


class Hooks:
    """The hooks protocol of install_module_calls, counting what it is called with."""

    def __init__(self, replace: torch.Tensor | None = None) -> None:
        self.depth = 0
        self.quiet: set[int] = set()
        self.pre: list[str] = []
        self.post: list[tuple[str, bool]] = []
        self.replace = replace

    def torch_pre(self, module: torch.nn.Module) -> None:
        self.pre.append(type(module).__name__)
        self.depth += 1

    def torch_post(self, module: torch.nn.Module, output: object) -> object:
        self.depth -= 1
        self.post.append((type(module).__name__, output is not None))
        return self.replace if isinstance(module, torch.nn.Linear) else None


class Boom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")


def test_quiet_modules_skip_the_hooks_only_inside_another_call():
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 3), torch.nn.Tanh())
    hooks = Hooks()
    remove = install_module_calls(hooks)
    try:
        x = torch.ones(1, 3)
        model(x)
        assert hooks.pre == ["Sequential", "ReLU", "Linear", "Tanh"]
        hooks.quiet |= {id(model[0]), id(model[2]), id(model)}
        hooks.pre.clear()
        model(x)
        assert hooks.pre == ["Sequential", "Linear"]  # the outermost call is hooked even when quiet
        hooks.pre.clear()
        model[0](x)  # a quiet module called by the script itself: depth 0, hooked
        assert hooks.pre == ["ReLU"] and hooks.depth == 0
    finally:
        remove()
    assert torch.nn.Module.__call__ is ORIGINAL_CALL


def test_a_quiet_or_lean_call_keeps_a_compiled_forward():
    """A quiet or lean call goes to torch's _call_impl itself, unless the module has a compiled
    forward (``Module.compile()`` sets ``_compiled_call_impl``): that one runs, as torch's own
    ``__call__`` would run it."""
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh())
    compiled = []
    inner = model[1]

    def fake_compiled(*args, **kwargs):  # what Module.compile() installs, without compiling
        compiled.append(1)
        return inner._call_impl(*args, **kwargs) * 2

    inner._compiled_call_impl = fake_compiled
    hooks = Hooks()
    hooks.lean = {id(model[0]): lambda out: True}
    hooks.quiet |= {id(inner)}
    remove = install_module_calls(hooks)
    try:
        x = torch.ones(1, 3)
        out = model(x)
        assert compiled == [1] and torch.equal(out, torch.tanh(torch.relu(x)) * 2)
        assert hooks.pre == ["Sequential"]  # neither the lean ReLU nor the quiet Tanh was hooked
    finally:
        remove()
        inner._compiled_call_impl = None
    assert torch.equal(model(x), torch.tanh(torch.relu(x)))


def test_post_sees_a_failed_forward_and_may_replace_the_output():
    hooks = Hooks(replace=torch.zeros(1, 3))
    remove = install_module_calls(hooks)
    try:
        with pytest.raises(ValueError, match="boom"):
            torch.nn.Sequential(Boom())(torch.ones(1, 3))
        assert hooks.post == [("Boom", False), ("Sequential", False)] and hooks.depth == 0
        out = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())(torch.ones(1, 3))
        assert torch.equal(out, torch.zeros(1, 3))  # the Linear's output replaced, ReLU of zeros
        hooks.pre.clear()
        torch.jit.trace(torch.nn.Linear(3, 3), torch.ones(1, 3), check_trace=False)
        assert hooks.pre == []  # calls while torch traces are not a run
    finally:
        remove()
    assert torch.nn.Module.__call__ is ORIGINAL_CALL


def test_removed_after_someone_else_wrapped_it_passes_through():
    hooks = Hooks()
    remove = install_module_calls(hooks)
    ours = torch.nn.Module.__call__

    def theirs(self, *args, **kwargs):
        return ours(self, *args, **kwargs)

    torch.nn.Module.__call__ = theirs
    try:
        remove()
        torch.nn.ReLU()(torch.ones(2))
        assert hooks.pre == []
    finally:
        torch.nn.Module.__call__ = ORIGINAL_CALL


PIECES = textwrap.dedent('''
    """Calls the model whole for two steps, then its pieces one by one from the script."""
    import sys
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.down(self.act(self.up(x)))

    class Net(nn.Module):
        def __init__(self, vocab=32, d=8):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.Sequential(*[Block(d) for _ in range(3)])
            self.head = nn.Linear(d, vocab)

        def forward(self, token):
            return self.head(self.blocks(self.emb(token)))

    model = Net().eval()
    token = torch.tensor([1])
    with torch.no_grad():
        for t in range(int(sys.argv[1])):
            if t < 2:
                logits = model(token)
            else:
                logits = model.head(model.blocks(model.emb(token)))
            token = logits[0].argmax().view(1)
            print(int(token))
''')


def test_steps_end_at_the_outermost_return_with_quiet_modules(tmp_path, capsys):
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    seen: dict[str, set[str]] = {}

    class Snooping(ScriptRecorder):
        def _end_step(self) -> None:  # the modules die with the script: look at them while it runs
            super()._end_step()
            seen["every"] = {info.name for info in self._mods.values()}
            seen["quiet"] = {info.name for key, info in self._mods.items() if key in self.quiet}

    result = run_script(str(script), ["6"], trace=tmp_path / "p.trace", modules=["Net.blocks.1.up"],
                        logits=["head"], recorder=Snooping)
    assert result.status == 0 and result.steps == 6
    printed = [int(x) for x in capsys.readouterr().out.split()]
    reader = TraceReader(tmp_path / "p.trace")
    rows = sorted(reader.decisions(columns=["step", "chosen"]).to_pylist(), key=lambda r: r["step"])
    assert [r["chosen"] for r in rows] == printed and [r["step"] for r in rows] == list(range(6))
    tensors = reader.tensors(columns=["step", "name", "call"]).to_pylist()
    assert sorted((r["step"], r["name"], r["call"]) for r in tensors) == [(s, "Net.blocks.1.up", 0) for s in range(6)]
    assert seen["quiet"] == seen["every"] - {"Net.blocks.1.up", "Net.head"} and len(seen["every"]) == 16
    assert torch.nn.Module.__call__ is ORIGINAL_CALL


def test_lean_modules_skip_both_hooks_inside_another_call():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Sequential(Boom()))
    hooks = Hooks()
    seen: list[tuple[str, torch.Tensor]] = []
    take = [True]

    def defer_of(name: str):
        def defer(output: object) -> bool:
            seen.append((name, output))  # type: ignore[arg-type]
            return take[0]
        return defer

    hooks.lean = {id(model[0]): defer_of("lin"), id(model[1]): defer_of("tanh"), id(model[2][0]): defer_of("boom")}
    remove = install_module_calls(hooks)
    try:
        x = torch.ones(1, 3)
        with pytest.raises(ValueError, match="boom"):
            model(x)
        # the outer calls are hooked; the lean ones only deferred (and a raising one seen by nobody)
        assert hooks.pre == ["Sequential", "Sequential"] and [n for n, _ in seen] == ["lin", "tanh"]
        assert hooks.post == [("Sequential", False), ("Sequential", False)] and hooks.depth == 0
        assert torch.equal(seen[1][1], torch.tanh(model[0](x)))
        hooks.pre.clear(), hooks.post.clear(), seen.clear()
        take[0] = False  # defer declines: torch_post sees the call, depth counted as torch_pre would
        torch.nn.Sequential(model[0], model[1])(x)
        assert hooks.pre == ["Sequential"] and hooks.post == [("Linear", True), ("Tanh", True), ("Sequential", True)]
        assert hooks.depth == 0 and [n for n, _ in seen] == ["lin", "tanh"]
        hooks.pre.clear(), seen.clear()
        model[0](x)  # called by the script itself (depth 0): the hooks, not defer
        assert hooks.pre == ["Linear"] and seen == []
    finally:
        remove()
    assert torch.nn.Module.__call__ is ORIGINAL_CALL


LEAN = textwrap.dedent('''
    """Outputs the lean path must copy, count and order as the hooks do: changed in place after
    the call, a module called twice per step, one returning a tuple at some calls, bfloat16, a
    tensor that requires grad, a non-contiguous one, and a module the script calls itself."""
    import sys
    import torch
    from torch import nn

    class Pair(nn.Module):
        def forward(self, x, n):
            return (x, x * 2) if n % 3 == 0 else x * 3

    class Net(nn.Module):
        def __init__(self, d=8, vocab=16):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, d)
            self.up = nn.Linear(d, d)
            self.act = nn.GELU()
            self.pair = Pair()
            self.bf = nn.Linear(d, d).to(torch.bfloat16)
            self.grad = nn.Linear(d, d)
            self.tr = nn.Identity()
            self.head = nn.Linear(d, vocab)

        def forward(self, token, n):
            h = self.up(self.emb(token))
            y = h.clone()
            h.mul_(0)  # the recorded output is changed after the call: the trace keeps what it was
            y = self.act(self.up(y)) + self.act(y)
            p = self.pair(y, n)
            y = p if torch.is_tensor(p) else p[1]
            y = y + self.bf(y.to(torch.bfloat16)).float()
            with torch.enable_grad():
                g = self.grad(y)
            y = y + g.detach() + self.tr(y.t()).t()
            return self.head(y)

    model = Net().eval()
    token = torch.tensor([1])
    with torch.no_grad():
        for n in range(int(sys.argv[1])):
            model.act(torch.ones(2))  # by the script: a root (GELU), call 0 of the step; the lean calls follow
            token = model(token, n)[0].argmax().view(1)
''')


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_the_lean_path_records_what_the_hooks_record(tmp_path, writer):
    from test_format_writer_process import assert_same_trace

    script = tmp_path / "lean.py"
    script.write_text(LEAN)
    deferred: list[int] = []

    class Counting(ScriptRecorder):
        def _end_step(self) -> None:
            deferred.append(len(self.lean))
            super()._end_step()

    class Hooked(ScriptRecorder):
        def _is_lean(self, info, rec) -> bool:
            return False

    for name, recorder in (("lean", Counting), ("hooked", Hooked)):
        result = run_script(str(script), ["7"], trace=tmp_path / f"{name}.trace", modules=["*"], tensors="full",
                            logits=["head"], writer=writer, recorder=recorder)
        assert result.status == 0 and result.steps == 7, result.traceback
    assert max(deferred) >= 6  # up, act, pair, bf, grad, tr took the lean path
    assert_same_trace(tmp_path / "hooked.trace", tmp_path / "lean.trace")
    reader = TraceReader(tmp_path / "lean.trace")
    rows = reader.tensors(columns=["step", "name", "call"]).to_pylist()
    calls = sorted((r["name"], r["call"]) for r in rows if r["step"] == 0)
    assert ("Net.up", 1) in calls and ("GELU", 2) in calls and ("Net.pair.0", 0) in calls
    assert not any(r["name"] == "Net.pair" for r in rows if r["step"] == 0)
    assert any(r["name"] == "Net.pair" for r in rows if r["step"] == 1)
    up = reader.tensor("0", 0, "Net.up", call=0)
    assert up.any()  # the values before h.mul_(0)


LOGITS = textwrap.dedent('''
    """A decode loop whose logits module meets every case the lean decision leaves to the hooks."""
    import sys
    import torch
    from torch import nn

    class Head(nn.Module):
        def __init__(self, d, vocab):
            super().__init__()
            self.lin = nn.Linear(d, vocab)

        def forward(self, h, n):
            y = self.lin(h)
            if n == 3:
                y = y * float("nan")  # NaN logits: their order needs the full decision
            if n == 5:
                y = y.to(torch.bfloat16)  # widened by the hooks' path
            if n == 6:
                y = y.half()  # a plain float dtype: the lean path's again
            return y

    class Net(nn.Module):
        def __init__(self, vocab=48, d=8):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(vocab, d)
            self.mix = nn.Linear(d, d)
            self.head = Head(d, vocab)

        def forward(self, token, n):
            h = torch.tanh(self.mix(self.emb(token)))
            if n == 7:
                with torch.enable_grad():  # logits that require grad: numpy() refuses them
                    return self.head(h.detach().requires_grad_(), n)
            if n == 8:
                self.head(h, n)  # two logits calls in one outer call: two steps
            return self.head(h, n)

    model = Net().eval()
    token = torch.tensor([1])
    with torch.no_grad():
        for n in range(int(sys.argv[1])):
            logits = model(token, n)
            token = logits[0].float().nan_to_num(0.0).argmax().view(1)
            print(int(token))
''')


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_the_lean_decision_decides_what_the_hooks_decide(tmp_path, writer, capsys):
    from test_format_writer_process import assert_same_trace

    script = tmp_path / "logits.py"
    script.write_text(LOGITS)
    hooked_decisions: list[int] = []

    class Counting(ScriptRecorder):
        def _decide(self, rec, name, t):
            hooked_decisions.append(self.steps)
            return super()._decide(rec, name, t)

    class Hooked(ScriptRecorder):
        def _is_lean_logits(self, info, rec, output) -> bool:
            return False

    printed = {}
    for name, recorder in (("lean", Counting), ("hooked", Hooked)):
        result = run_script(str(script), ["10"], trace=tmp_path / f"{name}.trace", logits=["head"], writer=writer,
                            recorder=recorder)
        assert result.status == 0 and result.steps == 11, result.traceback
        printed[name] = capsys.readouterr().out
    # the first decision makes it lean (its notes are made there); NaN, bfloat16 and
    # requires-grad logits are the hooks' (steps 3, 5, 7); float16 ones the lean path's
    assert hooked_decisions == [0, 3, 5, 7]
    assert printed["lean"] == printed["hooked"]
    assert_same_trace(tmp_path / "hooked.trace", tmp_path / "lean.trace")
    rows = sorted(TraceReader(tmp_path / "lean.trace").decisions(columns=["step", "chosen", "argmax"]).to_pylist(),
                  key=lambda r: r["step"])
    assert [r["step"] for r in rows] == list(range(11))
    assert [int(x) for x in printed["lean"].split()] == [r["chosen"] for r in rows if r["step"] != 8]


REPEATING = textwrap.dedent('''
    import sys
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, vocab=40, d=6):
            super().__init__()
            torch.manual_seed(1)
            self.emb = nn.Embedding(vocab, d)
            self.mix = nn.Linear(d, 3)  # 12-byte outputs: padded in a writer process's ring
            self.act = nn.Tanh()
            self.head = nn.Linear(3, vocab)

        def forward(self, token, n):
            h = self.act(self.mix(self.emb(token)))
            if n in (4, 5):
                h = self.act(h * 2)  # other rows on two steps: a call more
            return self.head(h)

    model = Net().eval()
    token = torch.tensor([1])
    with torch.no_grad():
        for n in range(int(sys.argv[1])):
            token = model(token, n)[0].argmax().view(1)
            print(int(token))
''')


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_recorded_steps_that_repeat_their_rows_write_what_row_by_row_writes(tmp_path, writer, capsys, monkeypatch):
    from test_format_writer_process import assert_same_trace
    from test_recorders_torch import template_rows_patches

    from steptrace.tracefmt.lane import RecorderLane

    script = tmp_path / "repeating.py"
    script.write_text(REPEATING)
    repeated: list[tuple[str, int, int]] = []
    for name, patch in template_rows_patches(repeated):
        monkeypatch.setattr(RecorderLane, "template_rows", patch)
        result = run_script(str(script), ["10"], trace=tmp_path / f"{name}.trace", modules=["*"], logits=["head"],
                            writer=writer)
        assert result.status == 0 and result.steps == 10, result.traceback
    # the modules inside (orders 0-3, before the decision and its logits' row) and the outer
    # module (order 5, or 6 after a call more) from the second step of the same rows on; the
    # modules inside have other rows at steps 4 and 5, and go row by row at 6 and 7 before
    # they repeat again
    assert [r[1:] for r in repeated] == [(2, 0), (2, 5), (3, 0), (3, 5), (6, 5), (7, 5), (8, 0), (8, 5), (9, 0), (9, 5)]
    assert_same_trace(tmp_path / "rows.trace", tmp_path / "template.trace")
    names = [(r["step"], r["name"], r["call"], r["order"]) for r in TraceReader(tmp_path / "template.trace").tensors(
        columns=["step", "name", "call", "order"]).to_pylist()]
    assert (4, "Net.act", 1, 3) in names and (9, "Net.head", 0, 3) in names and (9, "Net", 0, 5) in names
