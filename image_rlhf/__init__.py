"""image_rlhf: DDPO on diffusers pipelines against a CLIP-based learned reward (open_clip)."""
