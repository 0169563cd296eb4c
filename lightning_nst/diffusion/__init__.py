"""The diffusion wing: VGG-style-guided sampling of diffusers pipelines as a Lightning ``predict`` loop.

The model catalogue and loading, the sampler table, the families (SD, SDXL, SD3, Flux), the style guidance, the
prompt grid, the generation writer and the x̂₀ trajectory callback. It never imports the NST wing.
"""
