"""Record an unmodified Python script: the engine of ``trace record``.

:func:`run_script` runs ``script.py`` (or ``-m module``) in this process with ``runpy``, with
``sys.argv`` set to the script's arguments, while a :class:`~recorders.scripthooks.ScriptRecorder`
records it: every torch module call (:func:`recorders.torchcalls.install_module_calls`) once the
script imports torch, and ONNX Runtime sessions created by the script routed through the
recorder (:func:`recorders.onnxruntime.patch_sessions`) once it imports onnxruntime. Neither
framework is imported unless the script imports it (a post-import hook on ``sys.meta_path``).

The trace is closed however the script ends: normally, ``sys.exit(n)``, an uncaught exception
(reported in :class:`ScriptResult` with its traceback trimmed to the script's frames) or Ctrl-C
(SIGINT is held while a hook is writing, so no row is cut in half; the trace is closed, then
``interrupted`` is set). Limits: the script's model runs on one thread; ``run_with_iobinding``
is not recorded; modules compiled with ``torch.compile`` are not seen inside.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from steptrace.tracefmt import WriteSummary
from steptrace.tracefmt.errors import TraceError, TraceExistsError
from steptrace.tracefmt.schema import MANIFEST

from .errors import RecorderUsageError
from .scripthooks import SAMPLE_ENV, ScriptRecorder

__all__ = ["SAMPLE_ENV", "ScriptNotFoundError", "ScriptResult", "run_script"]


class ScriptNotFoundError(RecorderUsageError):
    """The script file or module to record does not exist."""


@dataclass
class ScriptResult:
    """How a recorded script ended, and what was recorded.

    Attributes:
        status: the script's exit status (0; ``sys.exit(n)``'s n; 1 after an uncaught exception).
        error: the script's uncaught exception, if any.
        traceback: its traceback text, trimmed to the script's frames.
        interrupted: the run was stopped by Ctrl-C (the caller re-raises KeyboardInterrupt).
        summary: the closed trace's :class:`steptrace.tracefmt.WriteSummary`.
        steps: steps decided (calls of the ``logits`` module or session output).
        notes: things the user should know (tensors skipped, batches, probabilities).
        names: every module and value name seen, in the order first seen (for messages about
            globs); ``relative`` maps each to its name after the root's label.
        unmatched_logits: ``logits`` globs that decided nothing.
        unmatched_modules: ``modules`` globs that recorded nothing.
        unmatched_sample_per: ``sample_per`` globs that started no sample.
        samples: samples started by ``sample_per`` calls.
        relative: full name -> name after its root's label (``GRULM.head`` -> ``head``).
    """

    status: int
    error: BaseException | None
    traceback: str | None
    interrupted: bool
    summary: WriteSummary
    steps: int
    notes: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    unmatched_logits: list[str] = field(default_factory=list)
    unmatched_modules: list[str] = field(default_factory=list)
    unmatched_sample_per: list[str] = field(default_factory=list)
    samples: int = 0
    relative: dict[str, str] = field(default_factory=dict)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callbacks[name](module)`` right after top-level module ``name`` is executed."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.callbacks = callbacks

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        del self.callbacks[fullname]
        exec_module = loader.exec_module

        def exec_then_call(module: ModuleType) -> None:
            exec_module(module)
            callback(module)

        loader.exec_module = exec_then_call  # type: ignore[method-assign]  # this spec's own loader
        return spec


def _check_output(trace: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse a trace path that cannot be written before running the script (the trace is
    created at the first record)."""
    root = Path(trace)
    if root.exists() and not root.is_dir():
        raise TraceExistsError(f"{root} exists and is a file; choose another path for the trace")
    if (root / MANIFEST).exists() and not overwrite:
        raise TraceExistsError(f"a trace already exists at {root}; pass --overwrite to replace it")
    if root.is_dir() and not (root / MANIFEST).exists() and any(root.iterdir()):
        raise TraceExistsError(f"{root} is a non-empty directory that is not a steptrace trace; choose another path")


def _status(code: object) -> tuple[int, str | None]:
    """Exit status and message of ``SystemExit(code)``, as the interpreter would exit."""
    if code is None:
        return 0, None
    if isinstance(code, int) and not isinstance(code, bool):
        return code, None
    return 1, str(code)


def _trimmed(exc: BaseException, files: set[str]) -> str:
    """The traceback of ``exc`` from the first frame in one of ``files`` (the script's)."""
    tb = exc.__traceback__
    while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) not in files:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def _caused_by(exc: BaseException, cause: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if exc is cause:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _locate(target: str, *, module: bool) -> tuple[str, set[str]]:
    """The file that runs (``sys.argv[0]``) and the files whose frames start a traceback.

    Raises:
        ScriptNotFoundError: no such script or module.
    """
    if not module:
        if not Path(target).is_file():
            raise ScriptNotFoundError(f"no script at {target}")
        return str(target), {os.path.realpath(target)}
    sys.path.insert(0, os.getcwd())  # as `python -m` does
    try:
        spec = importlib.util.find_spec(target)
        if spec is not None and spec.submodule_search_locations is not None:  # a package: its __main__
            spec = importlib.util.find_spec(f"{target}.__main__")
            if spec is None:
                raise ScriptNotFoundError(f"{target!r} is a package without __main__.py; name one of its modules")
    except (ImportError, ValueError) as exc:
        raise ScriptNotFoundError(f"cannot find module {target!r}: {exc}") from exc
    finally:
        del sys.path[0]
    if spec is None or spec.origin is None:
        raise ScriptNotFoundError(f"no module named {target!r} (run from its project folder, or install it)")
    return spec.origin, {os.path.realpath(spec.origin)}


def run_script(
    target: str,
    args: Sequence[str] = (),
    *,
    trace: str | os.PathLike[str],
    module: bool = False,
    modules: Sequence[str] = (),
    logits: Sequence[str] = (),
    tensors: str = "stats",
    teacher: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    sample: str = "0",
    sample_per: Sequence[str] = (),
    sample_ids: Sequence[str] | None = None,
    scores: str = "logits",
    k: int = 8,
    command: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    all_positions: bool = False,
    open_loop: Sequence[str] | None = None,
    writer: str = "auto",
    recorder: Callable[..., ScriptRecorder] = ScriptRecorder,
) -> ScriptResult:
    """Run a script (or ``-m`` module) in this process and record it into ``trace``.

    Args:
        target: the script's path, or the module's name with ``module=True``.
        args: the script's arguments (``sys.argv[1:]`` as it sees them).
        trace: the trace directory to write.
        module: run ``target`` as ``python -m target``.
        modules: globs of torch module names and ONNX value names to record.
        logits: globs of the module, output element or session output decided at each call.
        tensors: capture mode of ``modules``: ``"stats"``, ``"full"`` or ``"none"``.
        teacher: a reference trace: the decided logits returned to the script peak at its tokens.
        overwrite: replace an existing trace at ``trace``.
        sample: the sample id when the script does not set ``STEPTRACE_SAMPLE``.
        sample_per: globs of modules (or ONNX model stems) each call of which starts a sample.
        sample_ids: the ids of those samples in call order (None: ``"0"``, ``"1"``, ...).
        scores: what the ``logits`` outputs hold: ``"logits"``, ``"prob"`` or ``"logprob"``.
        k: top-k candidates per decision.
        command: the recording command line, for the trace's metadata.
        progress: called with the number of steps decided after each step.
        all_positions: decide every position of the logits output, one step per position.
        open_loop: heads not fed back (manifest ``open_loop``); None: ``["token"]`` with
            ``all_positions``, none otherwise.
        writer: where statistics, digests and files are made: ``"thread"`` (a background thread
            of this process), ``"process"`` (a writer process of its own, which never holds
            the script's GIL; ``TraceWriter(process=True)``) or ``"auto"`` (a process when
            ``modules`` are recorded, a thread otherwise).
        recorder: the :class:`ScriptRecorder` class (or a factory taking its arguments) that
            records the run; ``trace triage`` passes one that also transplants.

    Returns:
        The :class:`ScriptResult` (the script's exit status, its error and traceback, counts).

    Raises:
        ScriptNotFoundError: no such script or module.
        TraceExistsError: a trace exists at ``trace`` and ``overwrite`` is False.
        TraceNotFoundError: the ``teacher`` trace does not exist.
        RecorderUsageError: a bad ``scores``, ``sample_ids`` without ``sample_per``.
        TraceError: recording failed while the script ran (the writer, teacher forcing past
            the reference's last step, more ``sample_per`` calls than ``sample_ids``); the
            script's own errors are in the result instead.
    """
    _check_output(trace, overwrite)
    origin, files = _locate(target, module=module)
    shown = f"-m {target}" if module else str(target)
    meta = {"command": list(command) if command else None, "model": shown,
            "tags": {"steptrace.record.script": shown, "steptrace.record.logits": ",".join(logits) or "-",
                     "steptrace.record.modules": ",".join(modules) or "-", "steptrace.record.tensors": tensors,
                     "steptrace.record.sample_per": ",".join(sample_per) or "-", "steptrace.record.scores": scores}}
    hooks = recorder(trace, modules=modules, logits=logits, tensors=tensors, reference=teacher, sample=sample,
                     sample_per=sample_per, sample_ids=sample_ids, scores=scores, k=k,
                     mode="overwrite" if overwrite else "create", metadata=meta, progress=progress,
                     all_positions=all_positions, open_loop=open_loop, writer=writer)
    undo: list[Callable[[], None]] = []

    def on_torch(_module: ModuleType) -> None:
        from .torchcalls import install_module_calls

        undo.append(install_module_calls(hooks))

    def on_onnxruntime(_module: ModuleType) -> None:
        from .onnxruntime import patch_sessions

        undo.append(patch_sessions(hooks.ort_run))

    callbacks = {"torch": on_torch, "onnxruntime": on_onnxruntime}
    finder = _AfterImport({})
    for name, callback in callbacks.items():
        if name in sys.modules:
            callback(sys.modules[name])
        else:
            finder.callbacks[name] = callback
    sys.meta_path.insert(0, finder)

    def on_sigint(_signum: int, _frame: Any) -> None:
        if hooks.busy:
            hooks.interrupted = True  # raised when the hook's writing section ends
        else:
            raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    old_sigint = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    saved_argv, saved_path, saved_sample = sys.argv[:], sys.path[:], os.environ.get(SAMPLE_ENV)
    status, error, text, interrupted = 0, None, None, False
    try:
        if module:
            sys.argv = [origin, *args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [str(target), *args]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(str(target), run_name="__main__")
    except SystemExit as exc:
        status, text = _status(exc.code)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as exc:  # noqa: BLE001  (the script's own failure: reported in the result)
        if hooks.error is not None and _caused_by(exc, hooks.error):
            error = hooks.error
        else:
            status, error, text = 1, exc, _trimmed(exc, files)
    finally:
        hooks.busy += 1  # a second Ctrl-C waits until the trace is closed
        try:
            sys.argv, sys.path[:] = saved_argv, saved_path
            if saved_sample is None:
                os.environ.pop(SAMPLE_ENV, None)
            else:
                os.environ[SAMPLE_ENV] = saved_sample
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            for restore in reversed(undo):
                restore()
            summary = hooks.close()
        finally:
            if old_sigint is not None:
                signal.signal(signal.SIGINT, old_sigint)
    interrupted = interrupted or hooks.interrupted
    if isinstance(error, TraceError) and error is hooks.error:
        raise error
    logits_missed, modules_missed, sample_missed = hooks.unmatched()
    return ScriptResult(status, error, text, interrupted, summary, hooks.steps, hooks.notes, hooks.names,
                        logits_missed, modules_missed, sample_missed, hooks.samples_started, dict(hooks.relative))
