"""The official Wan2.2 release layout: written from the tiny models' weights, loaded into the same
components as the diffusers layout, bit-identical frames through the stage processes, and clear
MODEL_LOAD_ERRORs for incomplete or wrong folders."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from broker import loras
from broker.driver import Driver, default_params
from common import messages as m
from common.config import Config
from common.errors import ConfigError, ModelLoadError
from stages import official, official_keys, tiny_models
from stages.models import PipelineInfo, load_component, model_dir, scheduler_config
from tests.helpers import StageStack, make_lora, reference, short_tmpdir, stack_env, vae_frames

SHAPES = ("t2v-A14B", "ti2v-5B", "i2v-A14B")


@pytest.fixture(scope="module")
def folders(model_cache):
    """(diffusers folder, official folder) per tiny shape: the official one written from the other."""
    return {s: (tiny_models.ensure(s, 0, model_cache), tiny_models.ensure(s, 0, model_cache, "official"))
            for s in SHAPES}


def official_env(folders, **extra):
    env = {}
    for shape, (_, off) in folders.items():
        key = shape.upper().replace("-", "_")
        env |= {f"WAN_SERVER__MODELS__{key}__TINY": "false", f"WAN_SERVER__MODELS__{key}__PATH": str(off),
                f"WAN_SERVER__MODELS__{key}__LAYOUT": "official"}
    # Only these models (the tiny profile also serves s2v-14B, which would be built here).
    env["WAN_SERVER__SERVING__MODELS"] = json.dumps(sorted(folders))
    return env | extra


def safetensors_shapes(folder):
    index = json.loads((folder / official.INDEX_NAME).read_text())
    shapes = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(folder / file, framework="pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert set(shapes) == set(index["weight_map"])
    return shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_the_broker_reads_official_weights_under_diffusers_names(folders, shape):
    """What the broker checks LoRAs against: the linear weights of each expert, read from the
    official checkpoint's headers and renamed (broker/lora_keys), are the diffusers folder's."""
    diffusers_folder, official_folder = folders[shape]
    for expert in ("transformer", "transformer_2"):
        want = loras.expert_shapes(diffusers_folder, expert)
        got = loras.expert_shapes(official_folder, expert, "official")
        if want is None:
            assert got is None and shape == "ti2v-5B"
            continue
        linear = {k: s for k, s in want.items() if k.endswith(".weight") and len(s) == 2
                  and not k.startswith("patch_embedding")}
        assert got == linear and len(got) > 10


def test_official_files_are_named_and_shaped_as_the_release(folders):
    t2v, ti2v = folders["t2v-A14B"][1], folders["ti2v-5B"][1]
    for expert in ("high_noise_model", "low_noise_model"):
        config = json.loads((t2v / expert / "config.json").read_text())
        assert config["_class_name"] == "WanModel" and config["model_type"] == "t2v"
        assert set(official_keys.OFFICIAL_TRANSFORMER_FIELDS) <= set(config)
        shapes = safetensors_shapes(t2v / expert)
        dim, heads = config["dim"], config["num_heads"]
        assert shapes["blocks.0.self_attn.q.weight"] == (dim, dim)
        assert shapes["blocks.0.modulation"] == (1, 6, dim) and shapes["head.modulation"] == (1, 2, dim)
        assert shapes["blocks.0.norm3.weight"] == (dim,) and "blocks.0.norm2.weight" not in shapes
        assert shapes["patch_embedding.weight"] == (dim, config["in_dim"], 1, 2, 2)
        assert shapes["time_projection.1.weight"] == (6 * dim, dim) and dim % heads == 0
        assert len(list((t2v / expert).glob("diffusion_pytorch_model-0000?-of-00002.safetensors"))) == 2
    assert json.loads((ti2v / "config.json").read_text())["model_type"] == "ti2v"
    assert safetensors_shapes(ti2v)["patch_embedding.weight"][1] == 48

    t5 = torch.load(t2v / official.T5_FILE, weights_only=True)
    assert {"token_embedding.weight", "norm.weight", "blocks.1.pos_embedding.embedding.weight",
            "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.0.attn.o.weight"} <= set(t5)
    vae21 = torch.load(t2v / "Wan2.1_VAE.pth", weights_only=True)
    assert vae21["conv2.weight"].shape[0] == 16 and "decoder.middle.1.to_qkv.weight" in vae21
    assert "encoder.downsamples.0.residual.0.gamma" in vae21 and "encoder.downsamples.1.resample.1.weight" in vae21
    vae22 = torch.load(ti2v / "Wan2.2_VAE.pth", weights_only=True)
    assert vae22["conv2.weight"].shape[0] == 48 and vae22["encoder.conv1.weight"].shape[1] == 12
    assert "encoder.downsamples.0.downsamples.0.residual.0.gamma" in vae22
    assert "decoder.upsamples.0.upsamples.2.resample.1.weight" in vae22  # after num_res_blocks + 1 blocks
    assert not (ti2v / "Wan2.1_VAE.pth").exists() and not (t2v / "Wan2.2_VAE.pth").exists()
    for folder in (t2v, ti2v):
        assert (folder / official.TOKENIZER_DIR / "tokenizer_config.json").is_file()


def test_key_maps_agree_with_diffusers_converters_at_release_sizes():
    """Our diffusers -> official names, fed to diffusers' own converters, come back unchanged."""
    with init_empty_weights():
        dits = [
            WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                                  text_dim=4096, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads"),  # A14B expert
            WanTransformer3DModel(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                                  text_dim=4096, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads"),  # TI2V-5B
        ]
        vae21 = AutoencoderKLWan(base_dim=96, z_dim=16)
    for dit in dits:
        state = dit.state_dict()
        back = convert_wan_transformer_to_diffusers(
            {official_keys.transformer_key_to_official(k): v for k, v in state.items()})
        assert set(back) == set(state)
        shapes = {official_keys.transformer_key_to_official(k): tuple(v.shape) for k, v in state.items()}
        config = {"dim": dit.config.num_attention_heads * 128, "num_heads": dit.config.num_attention_heads,
                  "in_dim": dit.config.in_channels, "out_dim": dit.config.out_channels, "freq_dim": 256,
                  "ffn_dim": dit.config.ffn_dim, "num_layers": dit.config.num_layers, "eps": 1e-6}
        read = official_keys.transformer_config_from_official(config, shapes)
        assert all(read[k] == dit.config[k] or (k == "patch_size" and tuple(read[k]) == tuple(dit.config[k]))
                   for k in read), read
    state = vae21.state_dict()
    named = {official_keys.vae_key_to_official(k, 2, False): v for k, v in state.items()}
    back = convert_wan_vae_to_diffusers(named)
    assert set(back) == set(state) and all(back[k] is state[k] for k in state)
    read = official_keys.vae_config_from_official({k: tuple(v.shape) for k, v in named.items()}, False)
    assert (read["base_dim"], read["dim_mult"], read["num_res_blocks"], read["temperal_downsample"]) == (
        96, [1, 2, 4, 4], 2, [False, True, True])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_components_from_either_layout(folders, shape, dtype):
    """Same tensors, same dtypes (from_pretrained's float32-kept modules included), same configs."""
    diff, off = folders[shape]
    assert PipelineInfo.read(diff).__dict__ | {"folder": None} == PipelineInfo.read(off).__dict__ | {"folder": None}
    assert scheduler_config(diff) == scheduler_config(off)
    assert scheduler_config(off, 3.0) == scheduler_config(diff) | {"flow_shift": 3.0}
    components = ["vae", "text_encoder", "transformer"] + (["transformer_2"] if shape != "ti2v-5B" else [])
    from transformers import UMT5EncoderModel

    loaders = {"vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel}
    for name in components:
        loader = loaders.get(name, WanTransformer3DModel)
        kw = {"dtype": dtype} if name == "text_encoder" else {"torch_dtype": dtype}
        a, b = load_component(loader, diff, name, **kw), load_component(loader, off, name, **kw)
        assert type(a) is type(b)
        ta = dict(a.state_dict()) | {f"buffer:{k}": v for k, v in a.named_buffers()}
        tb = dict(b.state_dict()) | {f"buffer:{k}": v for k, v in b.named_buffers()}
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (name, k)
        if name.startswith("transformer"):
            assert {k: v for k, v in a.config.items() if not k.startswith("_")} == {
                k: v for k, v in b.config.items() if not k.startswith("_")}
    if dtype == torch.bfloat16:  # the float32-kept modules really are kept
        dit = load_component(WanTransformer3DModel, off, "transformer", torch_dtype=dtype)
        assert dit.scale_shift_table.dtype == torch.float32 and dit.blocks[0].attn1.to_q.weight.dtype == dtype
    from transformers import AutoTokenizer

    ta, tb = (load_component(AutoTokenizer, f, "tokenizer") for f in (diff, off))
    assert ta("a cat walks on the beach").input_ids == tb("a cat walks on the beach").input_ids


# ---- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def broken(folders, tmp_path):
    """A private copy of the official T2V folder to break."""
    dst = tmp_path / "t2v"
    shutil.copytree(folders["t2v-A14B"][1], dst)
    return dst


def config_for(folder, **extra) -> Config:
    env = {"WAN_SERVER__MODELS__T2V_A14B__TINY": "false", "WAN_SERVER__MODELS__T2V_A14B__PATH": str(folder)}
    return Config.load(environ=env | {f"WAN_SERVER__MODELS__T2V_A14B__{k.upper()}": v for k, v in extra.items()})


def test_missing_file_fails_naming_it(broken):
    (broken / official.T5_FILE).unlink()
    with pytest.raises(ModelLoadError) as err:
        model_dir(config_for(broken), "t2v-A14B")
    assert err.value.code == "MODEL_LOAD_ERROR" and official.T5_FILE in err.value.message
    assert err.value.details["missing"] == [official.T5_FILE]

    shard = broken / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(ModelLoadError) as err:
        load_component(WanTransformer3DModel, broken, "transformer_2", torch_dtype=torch.float32)
    assert str(shard) in err.value.message and official.INDEX_NAME in err.value.message


def test_wrong_shape_fails_naming_file_key_and_expected_shape(broken):
    shard = broken / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    state = load_file(shard)
    key = next(k for k in sorted(state) if k.endswith("self_attn.q.weight"))
    good = tuple(state[key].shape)
    state[key] = torch.zeros(good[0] + 2, good[1])
    save_file(state, shard)
    with pytest.raises(ModelLoadError) as err:
        load_component(WanTransformer3DModel, broken, "transformer", torch_dtype=torch.float32)
    msg = err.value.message
    assert str(shard) in msg and key in msg and str(list(good)) in msg, msg
    assert err.value.details["wrong_shape"][0] == {"key": key, "file": str(shard), "shape": [good[0] + 2, good[1]],
                                                  "expected": list(good)}


def test_missing_key_in_pth_fails_naming_it(broken):
    path = broken / "Wan2.1_VAE.pth"
    state = torch.load(path, weights_only=True)
    del state["decoder.middle.1.proj.weight"]
    torch.save(state, path)
    with pytest.raises(ModelLoadError) as err:
        load_component(AutoencoderKLWan, broken, "vae", torch_dtype=torch.float32)
    assert str(path) in err.value.message and "decoder.middle.1.proj.weight" in err.value.message
    assert err.value.details["missing"] == ["decoder.middle.1.proj.weight"]


class _RunsCode:
    """Pickles as a call to exec: what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pth_with_code_is_refused_without_running_it(broken, tmp_path):
    path = broken / official.T5_FILE
    marker = tmp_path / "ran.txt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "extra": _RunsCode(marker)}, path)
    with pytest.raises(ModelLoadError) as err:
        load_component(None, broken, "text_encoder", dtype=torch.float32)
    assert not marker.exists()
    assert err.value.code == "MODEL_LOAD_ERROR" and str(path) in err.value.message
    assert err.value.details["reason"] == "weights_only"


def test_layout_must_match_the_folder(folders):
    diff, off = folders["t2v-A14B"]
    assert model_dir(config_for(off), "t2v-A14B") == off  # detected
    assert model_dir(config_for(off, layout="official"), "t2v-A14B") == off
    for folder, wrong in ((off, "diffusers"), (diff, "official")):
        with pytest.raises(ModelLoadError) as err:
            model_dir(config_for(folder, layout=wrong), "t2v-A14B")
        assert err.value.details["found"] != wrong
    with pytest.raises(ConfigError, match=r"layout = 'comfy' is not one of"):  # refused when the profile is read
        config_for(off, layout="comfy")


# ---- through the stage processes -----------------------------------------------------------------


def test_stage_processes_give_identical_frames_from_official_folders(stack, folders):
    """The same jobs through stage processes loading the official folders and through the
    diffusers-layout stack. (One DiT process runs every step here, loading both experts: the
    hand-off between DiT processes is the diffusers stack's business, and a process less is cheaper.)"""
    state = short_tmpdir("wso-")
    official_stack = StageStack(state, state / "models", **official_env(
        folders, WAN_SERVER__RUNTIME__RECORD_DIR=str(state / "record"), WAN_SERVER__STAGES__DIT_HIGH__PART="all",
        WAN_SERVER__ROUTES__DEFAULT='["text_encoder", "dit_high", "vae", "muxer"]'))
    names = ["text_encoder", "dit_high", "vae", "muxer"]
    try:
        for name in names:
            official_stack.start(name)
        cases = [("t2v-A14B", "a cat dances on a neon stage", 4, 48, 32, 4.0, 3.0),
                 ("ti2v-5B", "a dog runs across the snow", 3, 32, 64, 5.0, None)]
        with Driver(official_stack.config) as driver:
            driver.wait_ready(names, timeout_s=240)
            for model, prompt, steps, h, w, g, g2 in cases:
                p = default_params(stack.config, model, prompt=prompt, negative_prompt="blurry", seed=17,
                                   steps=steps, height=h, width=w, num_frames=5, guidance_scale=g,
                                   guidance_scale_2=g2)
                ours, theirs = driver.submit(p), stack.driver.submit(p)
                assert driver.wait(ours, timeout_s=300).done is not None
                assert stack.driver.wait(theirs, timeout_s=300).done is not None
                a, b = vae_frames(official_stack, ours), vae_frames(stack, theirs)
                assert a.shape == (5, h, w, 3) and a.std() > 1.0
                assert np.array_equal(a, b), f"{model}: max |diff| {np.abs(a.astype(int) - b).max()}"
            # A LoRA on the official checkpoint (both experts): the broker checks it against the
            # official weights' names and shapes, the DiT loads it as on the diffusers layout, and
            # the frames are WanPipeline's with load_lora_weights on the diffusers folder.
            t2v = folders["t2v-A14B"][0]
            lora_dir = official_stack.config.lora_dir
            lora_dir.mkdir(parents=True, exist_ok=True)
            make_lora(t2v, "transformer", lora_dir / "x.high.safetensors", seed=1)
            make_lora(t2v, "transformer_2", lora_dir / "x.low.safetensors", seed=2)
            assert "one expert" in loras.scan(official_stack.config)["x"].fits["ti2v-5B"]
            p = default_params(stack.config, "t2v-A14B", prompt="a cat dances on a neon stage", negative_prompt="",
                               seed=3, steps=4, height=32, width=32, num_frames=5, guidance_scale=4.0,
                               guidance_scale_2=3.0)
            p = m.JobParams(**{**p.__dict__, "loras": loras.resolve(official_stack.config, "t2v-A14B",
                                                                    [{"name": "x", "scale": 0.8}])})
            job = driver.submit(p)
            assert driver.wait(job, timeout_s=300).done is not None

            def with_x(pipe):
                pipe.load_lora_weights(str(lora_dir / "x.high.safetensors"), adapter_name="x")
                pipe.load_lora_weights(str(lora_dir / "x.low.safetensors"), adapter_name="x",
                                       load_into_transformer_2=True)
                pipe.set_adapters(["x"], [0.8])

            assert np.array_equal(vae_frames(official_stack, job), reference(t2v, p, prepare=with_x))
        # Nothing tiny was built (the DiT's preview projection fit of these VAEs is cached there).
        assert not (state / "models").exists() or not [p for p in (state / "models").iterdir()
                                                        if p.name != "preview-fits"]
    finally:
        official_stack.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_stage_process_with_a_broken_folder_fails_at_startup(broken):
    state = short_tmpdir("wsb-")
    state_dict = torch.load(broken / "Wan2.1_VAE.pth", weights_only=True)
    state_dict["decoder.conv1.weight"] = state_dict["decoder.conv1.weight"][:, :8]
    torch.save(state_dict, broken / "Wan2.1_VAE.pth")
    env = {"WAN_SERVER__MODELS__T2V_A14B__TINY": "false", "WAN_SERVER__MODELS__T2V_A14B__PATH": str(broken),
           "WAN_SERVER__STAGES__VAE__MODELS": '["t2v-A14B"]'}
    s = StageStack(state, state / "models", **env)
    try:
        proc = s.start("vae")
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the vae stage did not exit on a broken checkpoint")
        log = s.log("vae")  # complete: the process wrote it and has exited
        assert proc.returncode == 3, log
        line = next(ln for ln in log.splitlines() if "could not start" in ln)
        body = json.loads(line.split("could not start: ", 1)[1])
        assert body["code"] == "MODEL_LOAD_ERROR"
        assert "Wan2.1_VAE.pth" in body["message"] and "decoder.conv1.weight" in body["message"]
        assert "Traceback" not in log
    finally:
        s.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_official_env_overrides_reach_the_config(folders, tmp_path):
    config = Config.load(environ=stack_env(tmp_path, folders["t2v-A14B"][1].parent, **official_env(folders)))
    for shape, (_, off) in folders.items():
        spec = config.model(shape)
        assert spec.layout == "official" and not spec.tiny and model_dir(config, shape) == off


def test_tiny_model_in_the_official_layout(folders, tmp_path):
    """`tiny = true` with `layout = "official"`: the tiny profile serves the official folder."""
    cache = folders["t2v-A14B"][1].parent
    config = Config.load(environ=stack_env(tmp_path, cache, WAN_SERVER__MODELS__T2V_A14B__LAYOUT="official"))
    assert model_dir(config, "t2v-A14B") == folders["t2v-A14B"][1]
    assert model_dir(config, "ti2v-5B") == folders["ti2v-5B"][0]


def test_legacy_pth_format_loads_too(tmp_path):
    """Files saved without the zip format cannot be mmapped; they are still read weights-only."""
    path = tmp_path / "old.pth"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(official.load_pth(path)["w"], torch.arange(4.0))
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelLoadError, match="state dict of named tensors"):
        official.load_pth(path)
