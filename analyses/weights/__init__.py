"""Parameter space: what the update dW = W_b - W_a is, read from the two checkpoints tensor by tensor.

``checkpoints`` reads safetensors / GGUF checkpoints with numpy; ``params`` (``unlearn-lens params``)
writes per-matrix and per-layer statistics (``params_stats``, ``params_linalg``), the matrix pairing
(``params_pairs``), their plots (``params_plots``) and the quantization flips (``quantization``).
"""
