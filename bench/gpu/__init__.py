"""Parts of the real-size GPU stage check (`bench/gpu_stage_check.py`), reusable by other benchmarks.

- `sizes`: the real model configs and the tiny ones of `--small`;
- `clock`: device-synchronised timing, peak memory and the time budget;
- `weights`: random-weight models built straight on the device, parameter and FLOP counts;
- `probe`: the environment (versions, attention backend, GPU flags), an SDPA probe, top kernels;
- `stages`: our DiT and VAE stages set up with no models and handed the built ones through their
  public methods (`DitStage.add_model`, `VaeStage.add_vae`); the one place that knows the stage
  runtime's hooks;
- `dit` and `vae`: the measured sections, each comparing our stage with diffusers on the same
  weights and inputs (time, peak memory, max |diff| of the outputs);
- `report`: the markdown table.
"""
