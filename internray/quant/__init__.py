"""The quantization stage: dense checkpoint -> int8 or AWQ-int4 checkpoint the serve engine loads.

    config.py    QuantConfig: model, method, group size, calibration data
    awq.py       activation statistics on calibration text, the per-group scale search, folding
    gptq.py      GPTQ rounding: int4 codes whose errors the columns after them absorb
    quantize.py  run_quantize: calibrate, scale, quantize, write the checkpoint and its manifest
The checkpoint format itself is shared with the engine: internray/models/quantized.py.
"""
