"""LoRA files not written by diffusers, read by name and shape: what diffusers' Wan LoRA loader turns
them into, so the broker checks and lists them as the DiT stage will load them (stages/lora.py
loads the file itself with `WanLoraLoaderMixin.lora_state_dict`, which converts on load).

Two formats besides diffusers' own (`transformer.<module>.lora_A.weight`) are published for Wan:
- the official names under `diffusion_model.` (ComfyUI, the Wan2.2-Lightning and LightX2V
  distillation LoRAs, most community LoRAs): `diffusion_model.blocks.0.self_attn.q.lora_down.weight`
  / `.lora_up.weight` (or `.lora_A` / `.lora_B`), an optional `.alpha` (the LoRA is scaled by
  alpha / rank; folded into the weights on load, so it changes no shape), `.diff_b` (a bias delta,
  loaded as `lora_B.bias`), and `.diff` (a whole-weight delta: only the head's is loaded, as a
  LoRA whose up matrix is the identity; the others, as diffusers does, are dropped);
- musubi-tuner's `lora_unet_blocks_0_self_attn_q.lora_down.weight` with `.alpha` (every block
  must hold all of q, k, v, o of both attentions and both FFN layers, since diffusers' converter
  needs them all).

Only names and shapes are mapped here (the broker never imports torch); tests/test_lora.py checks
the mapping against diffusers' converter on files that use every rule.
"""

from __future__ import annotations

import re

Shapes = dict[str, tuple[int, ...]]

OFFICIAL_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"

_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_IMAGE_ATTENTION = {"k_img": "add_k_proj", "v_img": "add_v_proj"}
_FFN = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
# The modules outside the blocks that diffusers' converter maps (official name -> diffusers name).
_OUTSIDE = {
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def format_of(keys: list[str]) -> str:
    """`diffusers`, `official` or `musubi`, as diffusers' loader tells them apart (by the first
    prefix it finds among the keys)."""
    if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
        return "official"
    if any(k.startswith(MUSUBI_PREFIX) for k in keys):
        return "musubi"
    return "diffusers"


def to_diffusers(shapes: Shapes) -> Shapes:
    """The diffusers LoRA keys and shapes a file in any of the three formats loads as; ValueError
    (its message says why) for a file diffusers' converter would refuse or that holds no LoRA."""
    kind = format_of(list(shapes))
    if kind == "official":
        return _from_official(shapes)
    if kind == "musubi":
        return _from_musubi(shapes)
    return dict(shapes)


def module_name(official: str, image_attention: bool) -> str | None:
    """The diffusers module for an official module name, or None if the converter maps none."""
    if official in _OUTSIDE:
        return _OUTSIDE[official]
    match = _BLOCK.match(official)
    if match is None:
        return None
    block, rest = match.groups()
    for attn, ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        if rest.startswith(attn + "."):
            proj = rest[len(attn) + 1:]
            if proj in _ATTENTION:
                return f"blocks.{block}.{ours}.{_ATTENTION[proj]}"
            if attn == "cross_attn" and image_attention and proj in _IMAGE_ATTENTION:
                return f"blocks.{block}.attn2.{_IMAGE_ATTENTION[proj]}"
            return None
    if rest in _FFN:
        return f"blocks.{block}.{_FFN[rest]}"
    return None


def _from_official(shapes: Shapes) -> Shapes:
    if not all(k.startswith(OFFICIAL_PREFIX) for k in shapes):
        odd = next(k for k in shapes if not k.startswith(OFFICIAL_PREFIX))
        raise ValueError(f"key {odd[:80]!r} lacks the {OFFICIAL_PREFIX} prefix the file's other keys have")
    keys = {k[len(OFFICIAL_PREFIX):]: s for k, s in shapes.items()}
    down = "lora_A" if any("lora_A" in k for k in keys) else "lora_down"
    up = "lora_B" if any("lora_B" in k for k in keys) else "lora_up"
    image_attention = any("k_img" in k for k in keys) and any("v_img" in k for k in keys)
    time_projection_weight = any(k.startswith("time_projection") and k.endswith(".weight") for k in keys)
    slots = {f".{down}.weight": "lora_A.weight", f".{up}.weight": "lora_B.weight", ".diff_b": "lora_B.bias"}
    out: Shapes = {}
    head_diff: tuple[int, ...] | None = None
    for key, shape in keys.items():
        if key.endswith((".diff", ".diff_b")) and "norm" in key:
            continue  # norm deltas: dropped by the converter (they are zeros in the files seen)
        if "time_projection" in key and not time_projection_weight:
            continue  # bias deltas with no weight (AccVideo): dropped by the converter too
        if key.endswith(".alpha"):
            if len(shape) > 1 or (shape and shape[0] != 1):
                raise ValueError(f"{key[:80]}: an alpha is one number, this has shape {list(shape)}")
            continue
        if key == "head.head.diff":
            head_diff = shape
            continue
        suffix = next((s for s in slots if key.endswith(s)), None)
        module = module_name(key[: -len(suffix)], image_attention) if suffix else None
        if module is None:
            if key.endswith(".diff") and "lora" not in key:
                continue  # a whole-weight delta the converter does not load (it logs and drops it)
            raise ValueError(f"key {OFFICIAL_PREFIX}{key[:80]!r} is not a LoRA key diffusers' Wan loader converts")
        assert suffix is not None
        out[f"transformer.{module}.{slots[suffix]}"] = shape
    for key in keys:
        if key.endswith(".alpha") and not any(k.startswith(key[: -len("alpha")]) and ("lora" in k) for k in keys):
            raise ValueError(f"{OFFICIAL_PREFIX}{key[:80]} has no LoRA weights beside it")
    if head_diff is not None:
        # The head's whole-weight delta becomes lora_A with an identity lora_B sized by its bias delta.
        bias = out.get("transformer.proj_out.lora_B.bias")
        if bias is None or len(head_diff) != 2:
            raise ValueError("head.head.diff needs head.head.diff_b beside it and two dimensions")
        out["transformer.proj_out.lora_A.weight"] = head_diff
        out["transformer.proj_out.lora_B.weight"] = (bias[0], head_diff[0])
    return out


_MUSUBI = re.compile(r"^blocks_(\d+)_(self_attn_[qkvo]|cross_attn_(?:[qkvo]|k_img|v_img)|ffn_[02])"
                     r"\.(lora_down\.weight|lora_up\.weight|alpha)$")


def _from_musubi(shapes: Shapes) -> Shapes:
    keys = {k[len(MUSUBI_PREFIX):] if k.startswith(MUSUBI_PREFIX) else k: s for k, s in shapes.items()}
    image_attention = any("k_img" in k for k in keys) and any("v_img" in k for k in keys)
    found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for key, shape in keys.items():
        match = _MUSUBI.match(key)
        if match is None:
            raise ValueError(f"key {MUSUBI_PREFIX}{key[:80]!r} is not a musubi-tuner Wan LoRA key")
        block, module, slot = match.groups()
        found.setdefault((int(block), module), {})[slot] = shape
    blocks = {b for b, _ in found}
    needed = [f"self_attn_{o}" for o in "qkvo"] + [f"cross_attn_{o}" for o in "qkvo"] + ["ffn_0", "ffn_2"]
    if image_attention:
        needed += ["cross_attn_k_img", "cross_attn_v_img"]
    out: Shapes = {}
    for block in range(len(blocks)):
        for module in needed:
            have = found.get((block, module), {})
            if set(have) != {"lora_down.weight", "lora_up.weight", "alpha"}:
                raise ValueError(f"{MUSUBI_PREFIX}blocks_{block}_{module} lacks lora_down, lora_up or alpha "
                                 "(diffusers' converter needs all three for every module of every block)")
            attn, _, proj = module.partition("_attn_")
            if module.startswith("ffn_"):
                name = f"blocks.{block}.{_FFN['ffn.' + module[-1]]}"
            elif proj in _IMAGE_ATTENTION:
                name = f"blocks.{block}.attn2.{_IMAGE_ATTENTION[proj]}"
            else:
                name = f"blocks.{block}.{'attn1' if attn == 'self' else 'attn2'}.{_ATTENTION[proj]}"
            out[f"transformer.{name}.lora_A.weight"] = have["lora_down.weight"]
            out[f"transformer.{name}.lora_B.weight"] = have["lora_up.weight"]
    if len(out) // 2 != len(found) or blocks != set(range(len(blocks))):
        raise ValueError("the file's blocks are not numbered 0..n-1 with the same modules in each, "
                         "as diffusers' converter needs")
    return out
