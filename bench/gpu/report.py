"""The markdown table of a gpu_stage_check run."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def diff_note(d: Any) -> str:
    """How far our stage's output is from diffusers' on the same inputs."""
    if not isinstance(d, dict):
        return "not compared"
    if "error" in d:
        return f"not compared: {d['error']}"
    if d.get("identical"):
        return "stage output identical"
    return (f"max |diff| vs stage {d['max_abs_diff']:.3g} "
            f"(mean {d['mean_abs_diff']:.3g}, max |ref| {d['max_abs_ref']:.3g})")


def table(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [
        (f"**{env.get('gpu', '?')}** — torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), diffusers "
         f"{env.get('diffusers')}, transformers {env.get('transformers')}, attention backend "
         f"`{env.get('diffusers_attention_backend')}` ({env.get('diffusers_attention_fn')}); "
         f"mode {results.get('mode')}, total {results.get('total_s')} s"),
        "",
        "| measurement | seconds | peak GiB | notes |",
        "| --- | --- | --- | --- |",
    ]

    def row(name: str, s: Any, peak: Any, note: str = "") -> None:
        lines.append(f"| {name} | {fmt(s, 3)} | {fmt(peak)} | {note} |")

    def err(d: Any) -> str:
        if not isinstance(d, dict):
            return "missing"
        return d.get("error") or d.get("skipped") or ""

    probe = results.get("sdpa_probe", {})
    for k, v in probe.items() if isinstance(probe, dict) else []:
        if isinstance(v, dict) and "median_s" in v:
            kern = v.get("kernels", [{}])[0].get("name", "?") if v.get("kernels") else "?"
            row(f"SDPA alone {k} {v.get('shape_BLHD')}", v["median_s"], v.get("peak_gib"),
                f"{v.get('tflops_per_s')} TFLOP/s; kernel `{kern[:60]}`")
    for key, label in (("ti2v", "TI2V-5B"), ("a14b", "A14B high expert")):
        d = results.get(key)
        if not isinstance(d, dict) or "stage" not in d:
            row(f"{label} DiT", None, None, err(d) or "not run")
            continue
        st = d["stage"]
        row(f"{label} {d['size']} {d['dtype']}: DitStage.handle, s/step (cond+uncond)", st.get("median_step_s"),
            st.get("peak_gib"),
            f"steps {st.get('steps_run')}: {st.get('step_s')}; weights {d.get('weights_gib')} GiB, "
            f"{d.get('params_b')}B params, {d.get('tokens')} tokens")
        pl = d.get("diffusers_pipeline", {})
        row(f"{label}: diffusers WanPipeline, same weights/inputs, s/step", pl.get("median_step_s"), pl.get("peak_gib"),
            err(pl) or f"steps {pl.get('step_s')}; stage/pipeline {d.get('stage_over_pipeline')}; "
                       f"{diff_note(pl.get('vs_stage'))}")
        a = d.get("direct_2x_batch1", {})
        row(f"{label}: diffusers direct, 2 x batch-1 forward (per step)", a.get("median_s"), a.get("peak_gib"),
            err(a) or f"runs {a.get('all_s')}; ~{a.get('approx_tflops_per_s')} TFLOP/s; "
                      f"stage/direct {d.get('stage_over_direct')}")
        if "direct_batch2" in d:
            b = d["direct_batch2"]
            row(f"{label}: diffusers direct, 1 x batch-2 forward (per step)", b.get("median_s"), b.get("peak_gib"),
                err(b) or f"runs {b.get('all_s')}; ~{b.get('approx_tflops_per_s')} TFLOP/s; vs 2 x batch-1: "
                          f"{diff_note(b.get('vs_2x_batch1'))}")
        kern = d.get("forward_top_kernels")
        if isinstance(kern, list) and kern:
            total_ms = sum(k["self_ms"] for k in kern)
            row(f"{label}: one forward under the profiler, top kernels", total_ms / 1000, None,
                "; ".join(f"`{k['name'][:50]}` {k['self_ms']} ms x{k['calls']}" for k in kern[:3]))
    for key, v in results.items():
        if not key.startswith("vae"):
            continue
        if not isinstance(v, dict) or "stage_handle" not in v:
            row(key, None, None, err(v) or "not run")
            continue
        h, dd = v["stage_handle"], v.get("direct_decode", {})
        row(f"{key} {v['size']} {v['dtype']}: VaeStage.handle", h.get("handle_s"), h.get("peak_gib"),
            err(h) or f"frames {h.get('frames_shape')} {h.get('frames_dtype')}")
        row(f"{key}: diffusers vae.decode direct", dd.get("decode_s"), dd.get("peak_gib"),
            err(dd) or f"then postprocess {dd.get('postprocess_np_s')} s + uint8 {dd.get('to_uint8_s')} s (CPU); "
                        f"frames {diff_note(dd.get('vs_stage_uint8'))}")
    return "\n".join(lines)


