"""Quantization: integer codes (`codes`), quantized Linear/Embedding modules and the in-place verbs
(`core`), calibrated GPTQ/AWQ (`calibration`), per-layer bit choice (`mixed`), quantization-aware
training (`qat`) and `stage: quantize` (`stage`)."""
