"""GLM-4.1V (AutoGLM-Phone-9B): config and checkpoint layout (``spec``, ``layout``, ``audio_spec``,
``audio_layout``) and export-ready towers written for torch.export with static shapes, each kept
numerically identical to transformers' modelling code: ``vision`` (one module per image bucket),
``text`` (token embedding and the decoder with its KV cache as module state), ``audio`` (the
optional GLM-ASR tower), ``decoder_forms`` (the decoder as the onnx, qnn / onnx-qnn and coreml
targets export it) and their shared ``blocks``.

Modules are built on the meta device and filled one tensor at a time (``load.py``);
``init_runtime_buffers`` creates the rotary tables and caches afterwards.
"""
