"""The torch half of :class:`recorders.scripthooks.ScriptRecorder`: :mod:`steptrace.recorders.script`
connects :meth:`ModuleHooks.torch_pre` and :meth:`ModuleHooks.torch_post` to every module call
(:func:`recorders.torchcalls.install_module_calls`): they name each module at its first call
(``ROOT.path``), record its output's tensors, decide a logits output and end the step at the
outermost return. A module found to need nothing (not recorded, not decided, starting no
sample) goes into ``quiet`` after its first call, and its later calls inside another module's
call skip both hooks. A module whose output is recorded and nothing more (not decided,
starting no sample) goes into ``lean``: its later calls inside another module's call skip both
hooks too, and :func:`recorders.torchcalls.lean_deferrer` copies its output for the step's rows.
A logits module decided as it is and recorded no other way (:meth:`ModuleHooks._is_lean_logits`)
takes a lean path of its own from its second call on: :func:`recorders.torchcalls.lean_decider`
decides its plain float CPU logits without the hooks, and leaves the rest to them.
torch itself is not imported here: modules and tensors are used through
their own methods.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from .decisions import is_torch_tensor
from .outputs import element_at, elements, replace_element
from .scriptnames import any_match

__all__ = ["ModuleHooks"]

_SELF = ()  # logits path: the module output itself (or its first tensor)


@dataclass
class _Mod:
    name: str
    rel: str  # the name after its root's label ("" for a root)
    source: str
    mode: str
    logits: tuple | bool | None  # element path, False (never), None (not known before its first output)
    starts_sample: bool = False


class ModuleHooks:
    """Mixin of :class:`~recorders.scripthooks.ScriptRecorder` for torch modules; uses its
    bookkeeping (labels, globs, samples, steps, the writing section)."""

    def _name_tree(self, root: Any) -> None:
        label = self._label(type(root).__name__)
        self._roots += 1
        for path, mod in root.named_modules():
            key = id(mod)
            if key in self._mods:
                continue
            name = f"{label}.{path}" if path else label
            logits = _SELF if self._is_logits(name, path) else None
            starts = any_match(self.sample_per, name, path)
            self._mods[key] = _Mod(name, path, type(mod).__name__, self._mode(name, path), logits, starts)
            self._refs[key] = weakref.ref(mod, lambda _ref, key=key: self._forget(key))
            self._seen(name, path)

    def _forget(self, key: int) -> None:
        """A named module died: drop its entry and its quiet mark (its id may be reused)."""
        self._refs.pop(key, None)
        self._mods.pop(key, None)
        self.quiet.discard(key)
        self.lean.pop(key, None)

    def torch_pre(self, module: Any) -> None:
        """Before a module's forward: name it (and its tree) at its first call; start a sample
        at a ``sample_per`` module; count depth.

        Raises:
            SampleIdsExhaustedError: more ``sample_per`` calls than sample ids.
        """
        info = self._mods.get(id(module))
        if info is None:
            self._name_tree(module)
            info = self._mods.get(id(module))
        if info is not None and info.starts_sample:
            with self._writing():
                self._start_sample(info.name)
        self.depth += 1

    def torch_post(self, module: Any, output: Any) -> Any:
        """After a module's forward: record its output, decide logits, end the step at the
        outermost return. Returns the output to use (teacher forcing) or None.

        Raises:
            TraceError: recording failed, or teacher forcing ran past the reference.
        """
        depth = self.depth = max(self.depth - 1, 0)
        info = self._mods.get(id(module))
        result = None
        if info is not None and self.sample_per and self._before_first_sample(info.name if depth == 0 else None):
            info = None
        if info is not None and output is not None and (info.mode != "none" or info.logits is not False):
            with self._writing():
                result = self._torch_output(module, info, output)
        if self.depth == 0 and self._decided:
            self._end_step()
        return result

    def _is_quiet(self, info: _Mod) -> bool:
        """Whether a module's calls inside another module's call need no hook: nothing of its
        output is recorded or decided, and its calls start no sample."""
        return info.mode == "none" and info.logits is False and not info.starts_sample

    def _is_lean(self, info: _Mod, rec: Any) -> bool:
        """Whether a module's calls inside another module's call may take the lean path: its
        output is recorded (by a recorder with no budget) and nothing more is done with it."""
        return (info.mode in ("stats", "full") and info.logits is False and not info.starts_sample
                and rec._ring is None)

    def _is_lean_logits(self, info: _Mod, rec: Any, output: Any) -> bool:
        """Whether a logits module's later calls inside another module's call may take the lean
        path (:func:`recorders.torchcalls.lean_decider`), from its second decision on (its notes
        are made at its first): its output itself is the logits, decided as they are (not
        probabilities, not every position), and nothing else is done with it or them (no
        record of the module or of ``logits:token``, no teacher, no budget, no sample start)."""
        return (info.logits == _SELF and info.mode == "none" and not info.starts_sample and is_torch_tensor(output)
                and self.scores != "prob" and not self.all_positions and rec._ring is None
                and not rec.teacher_forcing and rec._logits_mode("token") == "none")

    def _logits_path(self, info: _Mod, output: Any) -> tuple | None:
        if info.logits is None:  # first output seen: does an element match a logits glob?
            hits = [p for n, p, _ in elements(info.name, output)
                    if p and self._is_logits(n, n[len(info.name) - len(info.rel):] if info.rel else "")]
            info.logits = hits[0] if hits else False
        if info.logits is False:
            return None
        if info.logits == _SELF and not is_torch_tensor(output):
            elems = list(elements(info.name, output))
            by_key = [p for _, p, _ in elems if p and p[-1] == "logits"]
            return by_key[0] if by_key else (elems[0][1] if elems else None)
        return info.logits  # type: ignore[return-value]

    def _torch_output(self, module: Any, info: _Mod, output: Any) -> Any:
        first = info.logits is None
        path = None if info.logits is False else self._logits_path(info, output)
        if first and self._is_quiet(info):  # its logits path is known from now on: so is whether it is quiet
            self.quiet.add(id(module))
        if info.mode == "none" and path is None:
            return None
        rec = self.rec
        if rec is None:
            from .torch import torch_defaults

            rec = self._recorder(lambda: torch_defaults(module))
        if first and self._is_lean(info, rec):
            if self._defer is None:
                from .torchcalls import lean_deferrer

                self._defer = lean_deferrer(rec)
            self.lean[id(module)] = self._defer(info.name, info.source, info.mode == "full")
        if path is not None and self._decided:
            self._end_step()  # a second logits call inside one outer call: the next step
        self._open_step(rec)
        if info.mode != "none":
            call = rec.next_call(info.name)
            if is_torch_tensor(output):  # a module's usual output: one tensor, named as the module
                self._record(rec, info.name, output, call, info.source, info.mode)
            else:
                for name, _, t in elements(info.name, output):
                    self._record(rec, name, t, call, info.source, info.mode)
            self._recorded.add(info.name)
        if path is None:
            return None
        t = element_at(output, path)
        hit = info.name if info.logits == _SELF else ".".join([info.name, *map(str, path)])
        if info.rel and hit != info.name:
            self.relative[hit] = ".".join([info.rel, *map(str, path)])
        token = self._decide(rec, hit, t)
        if first is False and id(module) not in self.lean and self._is_lean_logits(info, rec, output):
            from .torchcalls import lean_decider

            self.lean[id(module)] = lean_decider(self, rec)
        if not rec.teacher_forcing:
            return None
        return replace_element(output, path, self._forced(t, token))
