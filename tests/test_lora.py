"""LoRAs per request: tiny LoRAs made here with peft for the tiny models, served from the LoRA folder.

- Through the real stage processes (the shared `stack`, its LoRA folder filled here): a job with a
  LoRA gives the frames of diffusers' `WanPipeline` with `load_lora_weights` of the same files and
  scales (the A14B low part with `load_into_transformer_2=True`), bit for bit; switching LoRAs per
  job (x, none, x) gives each job the frames of a fresh run; one file with both parts equals the
  pair of files; a LoRA file changed after submit fails that job (STAGE_ERROR) and the stages go on.
- In this process: the adapter cache keeps at most max_resident adapters (LRU), and a re-loaded
  adapter computes what a fresh one does.
- Through HTTP (the shared `api_system`): GET /api/v1/loras, every refusal at submit, and the
  LoRA set with its hashes in the result's metadata.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from broker import loras
from broker.driver import default_params
from common import messages as m
from common.config import Config
from common.errors import ConfigError, JobFailedError
from stages.lora import LoraCache
from stages.models import model_dir
from tests.helpers import ATTENTION, make_lora, official_lora, reference, vae_frames


def fill(lora_dir: Path, t2v: Path, ti2v: Path) -> None:
    lora_dir.mkdir(parents=True, exist_ok=True)
    high = make_lora(t2v, "transformer", lora_dir / "x.high.safetensors", seed=1)
    low = make_lora(t2v, "transformer_2", lora_dir / "x.low.safetensors", seed=2)
    # The same two parts in one file: the low part's keys under transformer_2.
    both = {**high, **{"transformer_2." + k.removeprefix("transformer."): v for k, v in low.items()}}
    metadata = load_metadata(lora_dir / "x.high.safetensors")
    save_file(both, lora_dir / "both.safetensors", metadata=metadata)
    make_lora(ti2v, "transformer", lora_dir / "five.safetensors", seed=3, rank=2,
              targets=[*ATTENTION, "proj_out"], alpha=3)
    make_lora(t2v, "transformer", lora_dir / "highonly.safetensors", seed=4, rank=3)
    # x again in the official names (diffusion_model.*, lora_down/lora_up, alpha) ComfyUI users have.
    save_file(official_lora(high, alpha=8), lora_dir / "comfy.high.safetensors")
    save_file(official_lora(low, alpha=8), lora_dir / "comfy.low.safetensors")
    # Shapes that fit no tiny model: lora_A takes 25 inputs where to_q takes 24.
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 25),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(24, 4)}, lora_dir / "wide.safetensors")
    # A module the model does not have.
    save_file({"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.ones(4, 24),
               "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.ones(24, 4)}, lora_dir / "deep.safetensors")
    (lora_dir / "evil.pth").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (lora_dir / "broken.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")


def load_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        metadata: dict[str, str] = json.loads(f.read(n))["__metadata__"]
    return metadata


@pytest.fixture(scope="module")
def lora_dir(stack) -> Path:
    """The stack's LoRA folder ([loras] dir defaults to <state_dir>/loras), filled with the test LoRAs."""
    folder = stack.config.lora_dir
    fill(folder, model_dir(stack.config, "t2v-A14B"), model_dir(stack.config, "ti2v-5B"))
    return folder


def with_loras(stack, p: m.JobParams, *wanted: tuple[str, float]) -> m.JobParams:
    """`p` with LoRAs resolved as admission resolves a request's custom_options.loras."""
    resolved = loras.resolve(stack.config, p.model, [{"name": n, "scale": s} for n, s in wanted])
    return m.JobParams(**{**p.__dict__, "loras": resolved})


def load_as_diffusers(lora_dir: Path, p: m.JobParams):
    """What a diffusers user does for `p.loras`: load_lora_weights of each file (the low part with
    load_into_transformer_2=True), then set_adapters with the scales."""
    def prepare(pipe: Any) -> None:
        for x in p.loras:
            for expert, part in x["parts"].items():
                pipe.load_lora_weights(str(lora_dir / part["file"]), adapter_name=x["name"],
                                       load_into_transformer_2=expert == "transformer_2")
        pipe.set_adapters([x["name"] for x in p.loras], [x["scale"] for x in p.loras])
    return prepare


@pytest.fixture(scope="module")
def jobs(stack, lora_dir):
    """Every job at once (they pipeline): x, none, x again, both-in-one-file, the 5B LoRA, two LoRAs."""
    base = default_params(stack.config, "t2v-A14B", prompt="a red car drives through the city at night",
                          negative_prompt="blurry", seed=5, steps=4, height=32, width=32, num_frames=5,
                          guidance_scale=4.0, guidance_scale_2=3.0)
    five = default_params(stack.config, "ti2v-5B", prompt="a dog runs across the snow", negative_prompt="",
                          seed=6, steps=3, height=32, width=32, num_frames=5, guidance_scale=4.0)
    cases = {
        "x": with_loras(stack, base, ("x", 0.8)),
        "none": base,
        "x_again": with_loras(stack, base, ("x", 0.8)),
        "comfy": with_loras(stack, base, ("comfy", 0.8)),
        "both": with_loras(stack, base, ("both", 0.8)),
        "two": with_loras(stack, base, ("highonly", -0.7), ("x", 1.5)),
        "five": with_loras(stack, five, ("five", 1.3)),
    }
    ids = {name: stack.driver.submit(p) for name, p in cases.items()}
    return {name: (cases[name], stack.driver.wait(job_id, timeout_s=300), vae_frames(stack, job_id))
            for name, job_id in ids.items()}


@pytest.mark.parametrize("case", ["x", "five", "two", "comfy"])
def test_frames_equal_wanpipeline_with_load_lora_weights(stack, lora_dir, jobs, case):
    p, _, ours = jobs[case]
    ref = reference(model_dir(stack.config, p.model), p, prepare=load_as_diffusers(lora_dir, p))
    assert ours.shape == ref.shape and ours.std() > 1.0
    assert np.array_equal(ours, ref), f"max |diff| {np.abs(ours.astype(int) - ref).max()}"
    # The LoRA changed the frames: without it they are the base model's.
    assert not np.array_equal(ours, reference(model_dir(stack.config, p.model), m.JobParams(**{**p.__dict__,
                                                                                               "loras": []})))


def test_switching_per_job_gives_fresh_frames(stack, jobs):
    """x, then none, then x again in the same processes: none is the base model exactly (the adapter
    stays resident but disabled) and x again is x."""
    p, _, none = jobs["none"]
    assert np.array_equal(none, reference(model_dir(stack.config, p.model), p))
    assert np.array_equal(jobs["x_again"][2], jobs["x"][2])
    assert not np.array_equal(jobs["x"][2], none)


def test_one_file_with_both_parts_equals_the_pair(jobs):
    assert np.array_equal(jobs["both"][2], jobs["x"][2])


def test_the_official_names_load_as_the_diffusers_file(jobs):
    """x saved in the official names (lora_down/lora_up, alpha 8 for rank 4) is x: diffusers folds
    alpha / rank into lora_A, a factor of 2, exact in floating point."""
    assert np.array_equal(jobs["comfy"][2], jobs["x"][2])


def every_rule_file(kind: str) -> dict[str, torch.Tensor]:
    """A LoRA in a non-diffusers format that uses every rule of diffusers' Wan converter: the
    official names (with lora_down/up and alphas, or lora_A/B without) or musubi-tuner's."""
    g = torch.Generator().manual_seed(0)
    r, dim, ffn = 2, 8, 12
    def pair(name: str, out: int, inp: int, down: str = "lora_down", up: str = "lora_up") -> dict[str, torch.Tensor]:
        return {f"{name}.{down}.weight": torch.randn(r, inp, generator=g),
                f"{name}.{up}.weight": torch.randn(out, r, generator=g), f"{name}.alpha": torch.tensor(3.0)}
    sd: dict[str, torch.Tensor] = {}
    if kind == "musubi":
        for i in range(2):
            for attn in ("self_attn", "cross_attn"):
                for o in "qkvo":
                    sd |= pair(f"lora_unet_blocks_{i}_{attn}_{o}", dim, dim)
            for o in ("k_img", "v_img"):
                sd |= pair(f"lora_unet_blocks_{i}_cross_attn_{o}", dim, dim)
            sd |= pair(f"lora_unet_blocks_{i}_ffn_0", ffn, dim) | pair(f"lora_unet_blocks_{i}_ffn_2", dim, ffn)
        return sd
    names = "lora_A", "lora_B"
    down, up = names if kind == "official_ab" else ("lora_down", "lora_up")
    p = "diffusion_model."
    for i in (3, 4):  # blocks need not start at 0
        for attn in ("self_attn", "cross_attn"):
            for o in "qkvo":
                sd |= pair(f"{p}blocks.{i}.{attn}.{o}", dim, dim, down, up)
            sd[f"{p}blocks.{i}.{attn}.o.diff_b"] = torch.randn(dim, generator=g)
            sd[f"{p}blocks.{i}.{attn}.norm_q.diff"] = torch.zeros(dim)  # dropped
        for o in ("k_img", "v_img"):
            sd |= pair(f"{p}blocks.{i}.cross_attn.{o}", dim, dim, down, up)
        sd |= pair(f"{p}blocks.{i}.ffn.0", ffn, dim, down, up) | pair(f"{p}blocks.{i}.ffn.2", dim, ffn, down, up)
        sd[f"{p}blocks.{i}.ffn.0.diff_b"] = torch.randn(ffn, generator=g)
        sd[f"{p}blocks.{i}.modulation.diff"] = torch.zeros(1, 6, dim)  # a whole-weight delta: dropped
    for name, out, inp in (("time_projection.1", 6 * dim, dim), ("text_embedding.0", dim, 16), ("text_embedding.2",
                           dim, dim), ("time_embedding.0", dim, 4), ("time_embedding.2", dim, dim)):
        sd[f"{p}{name}.{down}.weight"] = torch.randn(r, inp, generator=g)
        sd[f"{p}{name}.{up}.weight"] = torch.randn(out, r, generator=g)
    sd[f"{p}time_projection.1.diff_b"] = torch.randn(6 * dim, generator=g)
    sd[f"{p}head.head.diff"] = torch.randn(4, dim, generator=g)  # the LightX2V distill LoRAs' head
    sd[f"{p}head.head.diff_b"] = torch.randn(4, generator=g)
    sd[f"{p}img_emb.proj.1.{down}.weight"] = torch.randn(r, 10, generator=g)
    sd[f"{p}img_emb.proj.1.{up}.weight"] = torch.randn(10, r, generator=g)
    sd[f"{p}img_emb.proj.1.diff_b"] = torch.randn(10, generator=g)
    if kind == "official_ab":
        sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    return sd


@pytest.mark.parametrize("kind", ["official", "official_ab", "musubi"])
def test_the_brokers_key_map_is_what_diffusers_converts_to(kind):
    """The names and shapes the broker checks a non-diffusers LoRA by (broker/lora_keys, no torch)
    are those diffusers' Wan loader converts the same file to, rule by rule."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    from broker import lora_keys

    sd = every_rule_file(kind)
    converted = WanLoraLoaderMixin.lora_state_dict(dict(sd))
    ours = lora_keys.to_diffusers({k: tuple(v.shape) for k, v in sd.items()})
    assert ours == {k: tuple(v.shape) for k, v in converted.items()}
    assert len(ours) > 20


@pytest.mark.parametrize("kind, drop, words", [
    ("official", ["diffusion_model.blocks.3.ffn.0.lora_up.weight"], "lacks a 2-D lora_A or lora_B"),
    ("official", [f"diffusion_model.blocks.3.ffn.0.lora_{x}.weight" for x in ("up", "down")], "no LoRA weights"),
    ("musubi", ["lora_unet_blocks_1_ffn_2.alpha"], "lacks lora_down, lora_up or alpha"),
])
def test_a_file_diffusers_cannot_convert_is_refused_by_the_broker_too(kind, drop, words):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    from broker import lora_keys

    sd = every_rule_file(kind)
    for key in drop:
        del sd[key]
    with pytest.raises((KeyError, ValueError)):  # diffusers' converter fails on it
        WanLoraLoaderMixin.lora_state_dict(dict(sd))
    with pytest.raises(ValueError, match=words):
        loras._lora_modules(lora_keys.to_diffusers({k: tuple(v.shape) for k, v in sd.items()}))
    sd = every_rule_file(kind)
    sd["diffusion_model.patch_embedding.lora_down.weight" if kind == "official" else "lora_unet_x"] = torch.ones(1, 1)
    with pytest.raises(ValueError, match="not a"):
        lora_keys.to_diffusers({k: tuple(v.shape) for k, v in sd.items()})


def test_both_experts_got_their_part(stack, lora_dir, jobs):
    """Only the high part (or only the low) is not what the job computed: each DiT process loaded its own."""
    p, _, ours = jobs["x"]
    folder = model_dir(stack.config, p.model)
    for expert in ("transformer", "transformer_2"):
        one = m.JobParams(**{**p.__dict__, "loras": [{**p.loras[0], "parts": {expert: p.loras[0]["parts"][expert]}}]})
        assert not np.array_equal(ours, reference(folder, one, prepare=load_as_diffusers(lora_dir, one)))


def test_a_lora_that_fails_to_load_fails_the_job_only(stack, lora_dir):
    """A file changed since submit (its sha256 no longer the job's) or gone: the job fails with
    STAGE_ERROR from the DiT; the next job with LoRAs runs. (An adapter already resident is found by
    its hash and not read again.)"""
    p = with_loras(stack, default_params(stack.config, "t2v-A14B", prompt="refused", height=32, width=32, steps=2),
                   ("highonly", 1.0))
    changed = json.loads(json.dumps(p.loras))
    changed[0]["parts"]["transformer"]["sha256"] = "0" * 64
    gone = json.loads(json.dumps(p.loras))
    gone[0]["parts"]["transformer"].update(file="missing.safetensors", sha256="1" * 64)  # not resident either
    for bad in (changed, gone):
        with pytest.raises(JobFailedError) as info:
            stack.driver.run(m.JobParams(**{**p.__dict__, "loras": bad}), timeout_s=120)
        assert info.value.details["stage"] == "dit_high"
        assert info.value.details["error"]["code"] == "STAGE_ERROR"
        assert info.value.details["error"]["details"]["exception"] == "LoraLoadFailed"
    assert stack.driver.run(p, timeout_s=120).done.num_frames == p.num_frames
    assert stack.alive("dit_high") and stack.alive("dit_low")


def test_adapter_cache_unloads_the_least_recently_used(stack, lora_dir, tmp_path):
    folder = model_dir(stack.config, "t2v-A14B")
    names = []
    for i in range(3):
        make_lora(folder, "transformer", tmp_path / f"l{i}.safetensors", seed=10 + i, rank=2)
        names.append(f"l{i}")

    def job(*picked: str) -> list[dict[str, Any]]:
        return [{"name": n, "scale": 0.9, "parts": {"transformer": {
            "file": f"{n}.safetensors", "prefix": "transformer.",
            "sha256": hashlib.sha256((tmp_path / f"{n}.safetensors").read_bytes()).hexdigest()}}} for n in picked]

    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])

    def run() -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        return out

    plain = run()
    cache = LoraCache(tmp_path, max_resident=2)
    active = cache.apply({"transformer": model}, job("l0"))
    first = run()
    cache.apply({"transformer": model}, job("l1"))
    cache.apply({"transformer": model}, job("l0"))  # l0 is now the most recently used
    assert torch.equal(run(), first)
    cache.apply({"transformer": model}, job("l2"))  # unloads l1
    resident = set(model.peft_config)
    assert resident == {active["transformer"][0], cache.apply({"transformer": model}, job("l2"))["transformer"][0]}
    cache.apply({"transformer": model}, [])
    assert torch.equal(run(), plain)
    cache.apply({"transformer": model}, job("l1"))  # loaded again (unloading l0), computes what it did
    assert len(model.peft_config) == 2
    fresh = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
    LoraCache(tmp_path, 1).apply({"transformer": fresh}, job("l1"))
    with torch.no_grad():
        want = fresh(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(run(), want) and not torch.equal(want, plain)


# ---- through HTTP: the listing, the refusals, the metadata ----

@pytest.fixture(scope="module")
def served(api_system, lora_dir):
    """The same files in the shared API system's LoRA folder (its models are the same tiny ones)."""
    folder = api_system.config.lora_dir
    shutil.copytree(lora_dir, folder, dirs_exist_ok=True)
    return api_system


def test_listing(served, lora_dir):
    status, body = served.json("GET", "/api/v1/loras")
    assert status == 200
    by_name = {x["name"]: x for x in body["loras"]}
    assert set(by_name) == {"x", "both", "five", "highonly", "wide", "deep", "evil", "broken", "comfy"}
    assert by_name["comfy"]["models"] == by_name["x"]["models"] and by_name["comfy"]["rank"] == 4
    x = by_name["x"]
    assert x["files"] == {"transformer": "x.high.safetensors", "transformer_2": "x.low.safetensors"}
    assert x["sha256"] == {e: hashlib.sha256((lora_dir / f).read_bytes()).hexdigest() for e, f in x["files"].items()}
    assert x["rank"] == 4
    # Attention-only LoRAs fit the I2V experts too (the same attention shapes); a low part needs two experts.
    assert sorted(x["models"]) == ["i2v-A14B", "t2v-A14B"] and "one expert" in x["not_fitting"]["ti2v-5B"]
    assert by_name["both"]["files"] == {"transformer": "both.safetensors", "transformer_2": "both.safetensors"}
    # proj_out gives 48 latent channels x 2 x 2 there, 16 x 2 x 2 in the A14B experts
    assert by_name["five"]["models"] == ["ti2v-5B"] and "proj_out" in by_name["five"]["not_fitting"]["t2v-A14B"]
    assert sorted(by_name["highonly"]["models"]) == ["i2v-A14B", "t2v-A14B", "ti2v-5B"]
    for name in ("wide", "deep"):
        assert by_name[name]["models"] == [] and set(by_name[name]["not_fitting"]) == {"t2v-A14B", "i2v-A14B",
                                                                                      "ti2v-5B", "s2v-14B"}
    assert by_name["highonly"]["not_fitting"]["s2v-14B"] == "LoRAs are not supported for s2v-14B"
    assert by_name["evil"]["models"] == [] and "pickle" in by_name["evil"]["refused"]
    assert by_name["broken"]["models"] == [] and "header" in by_name["broken"]["refused"]
    assert body["scale"] == {"min": -2.0, "max": 2.0}
    # The broker read every header by hand: it never loaded torch (nor safetensors' torch bindings).
    maps = Path(f"/proc/{served.pid('broker')}/maps").read_text()
    assert "libtorch" not in maps and "site-packages/torch" not in maps and "safetensors" not in maps


@pytest.mark.parametrize("model, value, status, code, words", [
    ("t2v", [{"name": "nope", "scale": 1.0}], 422, "LORA_NOT_FOUND", "no LoRA 'nope'"),
    ("t2v", [{"name": "evil"}], 422, "LORA_INCOMPATIBLE", "pickle"),
    ("t2v", [{"name": "broken"}], 422, "LORA_INCOMPATIBLE", "refused"),
    ("t2v", [{"name": "wide"}], 422, "LORA_INCOMPATIBLE", "do not fit"),
    ("t2v", [{"name": "deep"}], 422, "LORA_INCOMPATIBLE", "no linear layer"),
    ("ti2v", [{"name": "x"}], 422, "LORA_INCOMPATIBLE", "one expert"),
    ("t2v", [{"name": "five"}], 422, "LORA_INCOMPATIBLE", "does not fit t2v-A14B"),
    ("t2v", [{"name": "x", "scale": 2.5}], 422, "VALIDATION_ERROR", "between -2.0 and 2.0"),  # [loras] bounds
    ("t2v", [{"name": "x", "scale": 9}], 422, "VALIDATION_ERROR", "between -4.0 and 4.0"),  # the catalog's
    ("t2v", [{"name": "x"}, {"name": "x"}], 422, "VALIDATION_ERROR", "named twice"),
    ("t2v", [{"name": "x"}] * 5, 422, "VALIDATION_ERROR", "at most 4 items"),
    ("t2v", [{"name": "../x"}], 422, "VALIDATION_ERROR", "a LoRA name"),
    ("t2v", [{"scale": 1.0}], 422, "VALIDATION_ERROR", "name is required"),
    ("t2v", [{"name": "x", "weight": 1}], 422, "VALIDATION_ERROR", "unknown field"),
    ("t2v", {"name": "x"}, 422, "VALIDATION_ERROR", "must be an array"),
])
def test_refused_at_submit(served, model, value, status, code, words):
    got, body = served.json("POST", "/api/v1/generate", {"model": model, "prompt": "a cat", "quality_preset": "draft",
                                                         "custom_options": {"loras": value}})
    assert got == status and body["error"]["code"] == code, body
    assert words in body["error"]["message"]
    assert body["error"]["details"]["field"].startswith("custom_options.loras")


def test_result_metadata_names_the_loras_and_hashes(served, lora_dir):
    job_id = served.submit(prompt="a cat dances on a neon stage", seed=3,
                           custom_options={"loras": [{"name": "highonly", "scale": -0.5}, {"name": "x", "scale": 1}]})
    assert served.wait_final(job_id)["status"] == "completed"
    status, body = served.json("GET", f"/api/v1/result/{job_id}")
    assert status == 200
    sha = {f: hashlib.sha256((lora_dir / f).read_bytes()).hexdigest()
           for f in ("highonly.safetensors", "x.high.safetensors", "x.low.safetensors")}
    assert body["metadata"]["loras"] == [
        {"name": "highonly", "scale": -0.5, "sha256": {"transformer": sha["highonly.safetensors"]}},
        {"name": "x", "scale": 1.0, "sha256": {"transformer": sha["x.high.safetensors"],
                                               "transformer_2": sha["x.low.safetensors"]}},
    ]


@pytest.mark.parametrize("key, value", [("MAX_SCALE", "5.0"), ("MIN_SCALE", "3.0"), ("MAX_PER_JOB", "9"),
                                        ("MAX_RESIDENT", "0"), ("MAX_RESIDENT", "'4'")])
def test_loras_section_bounds_are_checked_at_load(key, value):
    with pytest.raises(ConfigError) as info:
        Config.load(environ={f"WAN_SERVER__LORAS__{key}": value})
    assert info.value.details["section"] == "loras"
    assert Config.load(environ={}).lora_dir == Config.load(environ={}).state_dir / "loras"
