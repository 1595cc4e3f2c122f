"""Weight-only quantization settings shared by the prediction (params) and the attack.

Minimal version (engineer B): engineer C's module (numpy transcription of torchao's quantizers,
quantization_flips.csv) replaces it at merge; only these names are used by the attack.
"""

from __future__ import annotations

#: Group size of the int4 setting (torchao ``PerGroup``): one scale per 32 consecutive input weights.
INT4_GROUP_SIZE = 32

#: Setting -> how torchao quantizes a weight matrix: symmetric, per output row (int8) or per group (int4).
QUANT_SETTINGS = {
    "int8": {"bits": 8, "qmin": -128, "qmax": 127, "group_size": None, "mapping": "symmetric"},
    "int4": {"bits": 4, "qmin": -8, "qmax": 7, "group_size": INT4_GROUP_SIZE, "mapping": "symmetric"},
}
