"""steptrace: step-by-step parity debugging for ML inference.

The package's layers (see ``../shared/design/STYLE.md`` in the design card and docs/):

- :mod:`steptrace.tracefmt` — the trace format alone (SPEC.md): writer, reader, errors, JSONL.
- :mod:`steptrace.recorders` — runtime hooks that write traces (torch, ONNX Runtime, CoreML, HF).
- :mod:`steptrace.differ` — reads traces and judges them: alignment, verdicts, culprits, reports.
- :mod:`steptrace.tui` — the ``trace`` command, rich reports and the Textual viewer.
- :mod:`steptrace.assets` — the packaged tiny language model of ``trace demo``.

Importing ``steptrace`` imports none of them; import the layer you need.
"""

__version__ = "0.2.0"
