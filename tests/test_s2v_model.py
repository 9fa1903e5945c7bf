"""The S2V DiT, its release-layout loading and its clip loop, against the official Wan2.2 code.

The oracle is the release's own code (PyPI `wan22`, import name `wan`), loaded by
tests/wan_reference.py: its package `__init__`s (which import decord and torchvision) are bypassed
by registering empty package modules, and its `flash_attention` (CUDA + bf16 only) is replaced by
PyTorch SDPA in the inputs' dtype, the kernel our `sdpa` backend calls. Everything runs on the CPU
in float32 on tiny random weights (`stages.tiny_models.build_s2v_transformer`, loaded into the
release's `WanModel_S2V` by name: the names are the same), and is compared bit for bit.
"""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ModelLoadError
from stages import official, official_keys, tiny_models
from stages.s2v import rope, sampler
from stages.s2v.transformer import WanS2VTransformer
from tests import wan_reference

# the official code's torch.cuda.amp.autocast calls are deprecated: its warnings, not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:wan")

SIZE = 64  # pixels: the smallest side FramePack's 4x bucket (8 latent pixels) allows
LATENT = SIZE // 8
TEXT_DIM: int = tiny_models.TINY_S2V_CONFIG["text_dim"]
AUDIO_DIM: int = tiny_models.TINY_S2V_CONFIG["audio_dim"]
MOTION = (5, 2)  # a short motion window (pixel, latent frames) for tiny clips; the release's is (73, 19)


@pytest.fixture(scope="module")
def models() -> tuple[WanS2VTransformer, torch.nn.Module]:
    ours = tiny_models.build_s2v_transformer(0)
    config = dict(tiny_models.TINY_S2V_CONFIG)
    reference = wan_reference.s2v_model_class()(**config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # the same names, the same shapes
    return ours, reference


def _inputs(seed: int, latent_frames: int = 2, motion_latents: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "x": rnd(16, latent_frames, LATENT, LATENT),
        "ref": rnd(16, 1, LATENT, LATENT),
        "motion": rnd(16, motion_latents, LATENT, LATENT),
        "audio": rnd(1, 25, AUDIO_DIM, 4 * latent_frames),
        "context": rnd(7, TEXT_DIM),  # shorter than text_len: both sides zero-pad to 512
        "pose": rnd(16, latent_frames, LATENT, LATENT),
    }


@pytest.mark.parametrize("pose", [False, True], ids=["no-pose", "pose"])
@pytest.mark.parametrize("first_clip", [True, False], ids=["clip0", "later-clip"])
def test_forward_is_the_reference_forward_bit_for_bit(models, pose, first_clip, monkeypatch):
    """Clip 0 drops the motion tokens (the release's drop_first_motion); a later clip packs its
    motion latents. Without pose the release passes zero pose latents through cond_encoder. The
    rotary embedding runs in chunks of 7 tokens (8192 in use), so the chunking is exact too."""
    monkeypatch.setattr(rope, "ROPE_CHUNK", 7)
    ours, reference = models
    inp = _inputs(1 + 2 * pose + first_clip)
    cond = inp["pose"] if pose else torch.zeros_like(inp["pose"])
    t = torch.tensor([937])
    with torch.no_grad():
        want = reference(
            [inp["x"]],
            t=t,
            context=[inp["context"]],
            seq_len=None,
            ref_latents=[inp["ref"]],
            motion_latents=[inp["motion"]],
            cond_states=[cond],
            audio_input=inp["audio"],
            motion_frames=list(MOTION),
            drop_motion_frames=first_clip,
        )[0]
        got = ours(
            inp["x"][None],
            t,
            inp["context"][None],
            inp["ref"][None],
            inp["motion"][None],
            inp["audio"],
            inp["pose"][None] if pose else None,
            motion_frames=MOTION,
            drop_motion_frames=first_clip,
        )[0]
        # the inputs each matter: zeroed audio, another motion history, no pose give other outputs
        other = ours(
            inp["x"][None],
            t,
            inp["context"][None],
            inp["ref"][None],
            inp["motion"][None] * 0.5,
            inp["audio"] * 0,
            None,
            motion_frames=MOTION,
            drop_motion_frames=first_clip,
        )[0]
    assert got.dtype == torch.float32 and got.shape == want.shape == inp["x"].shape
    assert torch.equal(got, want)
    assert not torch.equal(got, other)


def test_release_layout_round_trip_and_refusals(tmp_path):
    folder = tiny_models.write_s2v_transformer(tmp_path / "s2v", seed=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "WanModel_S2V" and config["model_type"] == "s2v"
    assert config["audio_dim"] == 32 and config["audio_inject_layers"] == [0, 2]
    index = json.loads((folder / official.INDEX_NAME).read_text())["weight_map"]
    assert sorted(set(index.values())) == [f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)]

    again = tiny_models.write_s2v_transformer(tmp_path / "again", seed=0)
    other = tiny_models.write_s2v_transformer(tmp_path / "other", seed=1)
    for name in index.values():
        assert (folder / name).read_bytes() == (again / name).read_bytes()  # same seed, same files
    assert any((folder / n).read_bytes() != (other / n).read_bytes() for n in set(index.values()))

    model = official.load_component(folder, "transformer", torch.float32)
    built = tiny_models.build_s2v_transformer(0)
    assert isinstance(model, WanS2VTransformer)
    assert model.state_dict().keys() == built.state_dict().keys() == index.keys()
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in model.state_dict().items())
    bf16 = official.load_component(folder, "transformer", torch.bfloat16)
    assert bf16.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert bf16.blocks[0].modulation.dtype == torch.float32  # _keep_in_fp32_modules, as from_pretrained

    shard = folder / index["blocks.1.ffn.0.weight"]
    tensors = load_file(shard)

    tensors.pop("blocks.1.ffn.0.weight")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as missing:
        official.load_component(folder, "transformer", torch.float32)
    assert "blocks.1.ffn.0.weight" in str(missing.value) and str(shard) in str(missing.value)
    assert missing.value.code == "MODEL_LOAD_ERROR"

    extra = dict(tensors, **{"blocks.1.ffn.0.weight": torch.zeros(32, 24), "blocks.1.gate.weight": torch.zeros(2)})
    save_file(extra, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as unexpected:
        official.load_component(folder, "transformer", torch.float32)
    assert f"blocks.1.gate.weight (in {shard})" in str(unexpected.value)
    extra.pop("blocks.1.gate.weight")

    bad = dict(extra, **{"blocks.1.ffn.0.weight": torch.zeros(31, 24)})
    save_file(bad, shard, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as wrong:
        official.load_component(folder, "transformer", torch.float32)
    assert "blocks.1.ffn.0.weight has shape [31, 24], expected [32, 24]" in str(wrong.value)
    assert str(shard) in str(wrong.value)

    (folder / "config.json").write_text(json.dumps({**config, "enable_framepack": False}))
    with pytest.raises(ModelLoadError) as unsupported:
        official.load_component(folder, "transformer", torch.float32)
    assert "config.json" in str(unsupported.value)


def test_fp8_storage_through_the_stage_placement(tmp_path, models):
    """As for the other DiTs: weights stored in float8, cast layer by layer to bf16 for compute."""
    from stages.placement import Placement

    folder = tiny_models.write_s2v_transformer(tmp_path / "s2v", seed=0)
    inp = _inputs(9)
    args = (
        inp["x"][None],
        torch.tensor([500]),
        inp["context"][None],
        inp["ref"][None],
        inp["motion"][None],
        inp["audio"],
        None,
    )
    outs = {}
    for storage in (None, torch.float8_e4m3fn):
        placement = Placement("dit", torch.device("cpu"), torch.bfloat16, storage, "sdpa")
        model = placement.place(official.load_component(folder, "transformer", torch.bfloat16), "s2v-14B")
        with torch.no_grad():
            outs[storage] = model(*args, motion_frames=MOTION)
    stored = {p.dtype for n, p in model.named_parameters() if n.startswith("blocks.") and n.endswith(".q.weight")}
    assert stored == {torch.float8_e4m3fn}
    with torch.no_grad():
        full = models[0](*args, motion_frames=MOTION)
    assert not torch.equal(outs[None], outs[torch.float8_e4m3fn])
    for out in outs.values():
        assert out.dtype == torch.float32 and (out - full).abs().max() < 0.25 * full.abs().max()


def test_scheduler_is_the_reference_unipc():
    ref_cls = wan_reference.unipc_scheduler_class()
    for steps, shift in ((40, 3.0), (3, 3.0), (7, 5.0)):
        ref = ref_cls(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        ref.set_timesteps(steps, device="cpu", shift=shift)
        ours = sampler.make_scheduler(steps, shift)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
        g = torch.Generator().manual_seed(steps)
        a = b = torch.randn(1, 16, 2, 4, 4, generator=g)
        for t in ref.timesteps:
            out = torch.randn(1, 16, 2, 4, 4, generator=g)
            a = ref.step(out, t, a, return_dict=False)[0]
            b = ours.step(out, t, b, return_dict=False)[0]
        assert torch.equal(a, b)


def test_a_clip_split_between_two_processes_is_exact(models):
    """The DiT processes share a clip's steps: the first runs steps 0..1 and exports the clip, the
    second prepares the same clip from the same inputs, resumes, and finishes: as one process."""
    ours, _ = models
    settings = sampler.S2VSettings(seed=3, steps=4, frames_per_clip=8, motion_frames=MOTION[0])
    inp = _inputs(11)
    args = (
        ours,
        settings,
        1,
        inp["context"][None],
        inp["context"][:3][None],
        inp["ref"][None],
        inp["motion"][:, :2][None],
        inp["audio"],
    )
    whole = sampler.prepare_clip(*args)
    while not whole.done:
        sampler.denoise_step(ours, whole)
    first = sampler.prepare_clip(*args)
    for _ in range(2):
        sampler.denoise_step(ours, first)
    handed = sampler.export_clip(first)
    second = sampler.prepare_clip(*args, resume=handed)
    assert second.step == 2 and not second.done
    while not second.done:
        sampler.denoise_step(ours, second)
    assert torch.equal(second.latents, whole.latents)


def _reference_vae(vae):
    """The release's Wan2_1_VAE around its WanVAE_ at the tiny VAE's sizes (its constructor builds
    the 14B release's sizes from a file, so it is bypassed; encode/decode are the release's)."""
    vae_module = wan_reference.load("wan.modules.vae2_1")
    net = vae_module.WanVAE_(
        dim=vae.config.base_dim,
        z_dim=vae.config.z_dim,
        dim_mult=list(vae.config.dim_mult),
        num_res_blocks=vae.config.num_res_blocks,
        attn_scales=[],
        temperal_downsample=list(vae.config.temperal_downsample),
        dropout=0.0,
    ).eval()
    n = vae.config.num_res_blocks
    net.load_state_dict({official_keys.vae_key_to_official(k, n, False): v for k, v in vae.state_dict().items()})
    wrapper = object.__new__(vae_module.Wan2_1_VAE)
    wrapper.dtype, wrapper.device, wrapper.model = torch.float32, "cpu", net
    wrapper.mean, wrapper.std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    wrapper.scale = [wrapper.mean, 1.0 / wrapper.std]
    return wrapper


def _reference_clip_loop(model, vae, settings, context, context_null, ref_pixels, audio_emb, num_repeat, pose):
    """wan/speech2video.py `WanS2V.generate`'s loop from "extract audio emb" on, with the release's
    model class, scheduler and VAE code. Replicated rather than called, because generate reads the
    image and audio from files (PIL, librosa + its wav2vec2), loads its own T5/VAE/DiT from a
    14B-sized checkpoint folder and allocates CUDA generators; the statements below are generate's,
    with the inputs given (the audio features, the prompts' embeddings, the fitted image) and float32
    on the CPU. The pose video is given as frames in [-1, 1] of the job's size (generate reads,
    resizes and crops it with decord and torchvision); from there `load_pose_cond`'s statements."""
    ref_cls = wan_reference.unipc_scheduler_class()
    infer_frames, motion_frames = settings.frames_per_clip, settings.motion_frames
    height, width = ref_pixels.shape[-2:]
    lat_motion_frames = (motion_frames + 3) // 4
    motion_latents = torch.zeros([1, 3, motion_frames, height, width])
    ref_latents = torch.stack(vae.encode(ref_pixels))
    videos_last_frames = motion_latents.detach()
    drop_first_motion = settings.drop_first_motion
    motion_latents = torch.stack(vae.encode(motion_latents))
    cond_list = []  # load_pose_cond
    for cond in torch.chunk(pose, num_repeat, dim=2):
        cond = torch.cat([cond[:, :, 0:1].repeat(1, 1, 1, 1, 1), cond], dim=2)
        cond_list.append(torch.stack(vae.encode(cond.to(dtype=torch.float32)))[:, :, 1:].cpu())
    out, all_latents = [], []
    for r in range(num_repeat):
        seed_g = torch.Generator(device="cpu")
        seed_g.manual_seed(settings.seed + r)
        lat_target_frames = (infer_frames + 3 + motion_frames) // 4 - lat_motion_frames
        noise = [torch.randn(16, lat_target_frames, height // 8, width // 8, dtype=torch.float32, generator=seed_g)]
        scheduler = ref_cls(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        scheduler.set_timesteps(settings.steps, device="cpu", shift=settings.shift)
        latents = deepcopy(noise)
        cond_latents = cond_list[r]
        audio_input = audio_emb[..., r * infer_frames : r * infer_frames + infer_frames]
        common = {
            "seq_len": None,
            "cond_states": cond_latents,
            "motion_latents": motion_latents.clone(),
            "ref_latents": ref_latents,
            "motion_frames": [motion_frames, lat_motion_frames],
            "drop_motion_frames": drop_first_motion and r == 0,
        }
        arg_c = {"context": context[0:1], "audio_input": audio_input, **common}
        arg_null = {"context": context_null[0:1], "audio_input": 0.0 * audio_input, **common}
        for t in scheduler.timesteps:
            timestep = torch.stack([t])
            pred_c = model(latents[0:1], t=timestep, **arg_c)
            pred_u = model(latents[0:1], t=timestep, **arg_null)
            pred = [u + settings.guidance * (c - u) for c, u in zip(pred_c, pred_u, strict=True)]
            latents[0] = scheduler.step(
                pred[0].unsqueeze(0), t, latents[0].unsqueeze(0), return_dict=False, generator=seed_g
            )[0].squeeze(0)
        latents = torch.stack(latents)
        all_latents.append(latents)
        if not (drop_first_motion and r == 0):
            decode_latents = torch.cat([motion_latents, latents], dim=2)
        else:
            decode_latents = torch.cat([ref_latents, latents], dim=2)
        image = torch.stack(vae.decode(decode_latents))
        image = image[:, :, -infer_frames:]
        if drop_first_motion and r == 0:
            image = image[:, :, 3:]
        overlap = min(motion_frames, image.shape[2])
        videos_last_frames = torch.cat([videos_last_frames[:, :, overlap:], image[:, :, -overlap:]], dim=2)
        motion_latents = torch.stack(vae.encode(videos_last_frames))
        out.append(image)
    return torch.cat(out, dim=2), all_latents


def test_clip_loop_is_the_reference_loop(models):
    """Two clips (clip 0 without motion tokens, clip 1 with the motion latents of clip 0's last
    frames) of 8 frames with a 5-frame motion window, 3 steps, CFG 4.5, a pose video: our in-process
    loop (diffusers' AutoencoderKLWan and UniPC) gives the reference loop's latents and frames bit for
    bit. (The loop without pose differs only by zero pose latents, which the forward test covers.)"""
    ours, reference = models
    vae = tiny_models.build_vae(30, False)
    settings = sampler.S2VSettings(seed=42, steps=3, frames_per_clip=8, motion_frames=MOTION[0])
    assert (settings.motion_latent_frames, settings.latent_frames) == (MOTION[1], 2)
    g = torch.Generator().manual_seed(5)
    context, context_null = torch.randn(6, TEXT_DIM, generator=g), torch.randn(4, TEXT_DIM, generator=g)
    ref_pixels = torch.rand(1, 3, 1, SIZE, SIZE, generator=g) * 2 - 1
    audio = torch.randn(1, 25, AUDIO_DIM, 2 * settings.frames_per_clip, generator=g)
    pose = torch.rand(1, 3, 2 * settings.frames_per_clip, SIZE, SIZE, generator=g) * 2 - 1

    got = sampler.run_job(
        ours, vae, settings, context[None], context_null[None], ref_pixels, audio, num_clips=2, pose_pixels=pose
    )
    want, want_latents = _reference_clip_loop(
        reference, _reference_vae(vae), settings, [context], [context_null], ref_pixels, audio, 2, pose
    )
    assert [c.frames.shape[2] for c in got.clips] == [settings.frames_of_clip(0), settings.frames_of_clip(1)] == [5, 8]
    for ours_latents, ref_latents in zip(got.final_latents, want_latents, strict=True):
        assert torch.equal(ours_latents, ref_latents)
    assert got.video.shape == want.shape == (1, 3, 13, SIZE, SIZE)
    assert torch.equal(got.video, want)
    assert not torch.equal(got.clips[0].frames[:, :, -5:], got.clips[1].frames[:, :, -5:])
