"""The steptrace demo's tiny character LM: model, training, export, torch and ONNX Runtime decoders.

Modules: ``data`` (corpus and vocabulary), ``model`` (torch model, loader from ONNX), ``train``,
``export``, ``decode_torch`` (torch greedy decoding) and ``ortlm`` (numpy + onnxruntime greedy
decoding; imports no torch). The trained model lives in ``assets/tiny_lm``.
"""
