"""Quantized compute (`[stages.<dit>] compute_dtype`, stages/quantize.py) through the real stage
processes: a tiny job on int8 DiTs gives the frames of diffusers' `WanPipeline` with torchao's
int8 dynamic quantization applied to the same layers of both experts (the same kernels on the
same weights: bit for bit), differs from the float32 frames by a bounded amount (PSNR), and the
result's metadata names the quantized stages; fp8 on the CPU and fp8 beside fp8 storage are
refused at startup with the structured error. (The stack, conftest's `int8_stack`, also compiles
dit_high for test_compile, with a backend that runs the same ops as eager.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from broker.api import compute_metadata
from broker.driver import default_params
from common.config import Config
from common.errors import ConfigError, ModelLoadError
from stages.models import model_dir
from stages.placement import Placement
from tests.helpers import INT8_DITS, reference, vae_frames

# Quantized frames against the float32 ones on these tiny random models: far from equal (so the
# quantization really ran) and far from noise.
PSNR_BOUNDS_DB = (20.0, 80.0)


def quantize_blocks(module: torch.nn.Module) -> None:
    """What the README promises, written out here: torchao's int8 dynamic activation and weight
    quantization on the Linear layers under `blocks.`."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(module, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn.startswith("blocks."))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_int8_frames_equal_wanpipeline_quantized_the_same_way(int8_stack):
    p = default_params(int8_stack.config, "t2v-A14B", prompt="a paper boat on a stream", negative_prompt="",
                       seed=21, steps=4, height=32, width=32, num_frames=5, guidance_scale=4.0, guidance_scale_2=3.0)
    done = int8_stack.driver.run(p, timeout_s=300).done
    ours = vae_frames(int8_stack, done.job_id)
    folder = model_dir(int8_stack.config, p.model)

    def prepare(pipe):
        quantize_blocks(pipe.transformer)
        quantize_blocks(pipe.transformer_2)

    quantized = reference(folder, p, prepare=prepare)
    assert ours.shape == quantized.shape and ours.std() > 1.0
    assert np.array_equal(ours, quantized), f"max |diff| {np.abs(ours.astype(int) - quantized).max()}"
    exact = reference(folder, p)
    assert PSNR_BOUNDS_DB[0] < psnr(ours, exact) < PSNR_BOUNDS_DB[1]


def test_the_result_names_the_quantized_stages():
    config = Config.load(environ=INT8_DITS)
    route = ["text_encoder", "dit_high", "dit_low", "vae", "muxer"]
    assert compute_metadata(config, route) == {"dit_high": "int8", "dit_low": "int8"}
    assert compute_metadata(Config.load(environ={}), route) is None


def test_fp8_compute_is_refused_on_the_cpu_at_startup():
    spec = Config.load(environ={"WAN_SERVER__STAGES__DIT_HIGH__COMPUTE_DTYPE": '"fp8"'}).stage("dit_high")
    with pytest.raises(ModelLoadError) as caught:
        Placement.from_spec(spec, attention=True)
    assert caught.value.code == "MODEL_LOAD_ERROR" and caught.value.details["compute_dtype"] == "fp8"
    assert "capability 8.9" in caught.value.message


@pytest.mark.parametrize(("env", "words"), [
    ({"WAN_SERVER__STAGES__DIT_HIGH__COMPUTE_DTYPE": '"int4"'}, "is not one of"),
    ({"WAN_SERVER__STAGES__DIT_HIGH__COMPUTE_DTYPE": '"int8"',
      "WAN_SERVER__STAGES__DIT_HIGH__STORAGE_DTYPE": '"float8_e4m3fn"'}, "both storage_dtype and compute_dtype"),
    ({"WAN_SERVER__STAGES__VAE__COMPUTE_DTYPE": '"int8"'}, "unknown key"),
])
def test_bad_compute_settings_are_config_errors(env, words):
    with pytest.raises(ConfigError) as caught:
        Config.load(environ=env)
    assert words in caught.value.message
