"""Stage processes: text_encoder, dit, vae, muxer. Each runs as `python -m stages.<name>`."""
