"""The diffusion wing: VGG-style-guided sampling of diffusers pipelines as a Lightning ``predict`` loop.

The model catalogue (``catalog``), the sampler table (``samplers``), loading (``loading``), the families (SD, SDXL,
SD3, Flux; ``families``), latents and the VAE (``latents``), the style guidance (``guidance``), the denoising loop
(``loop``), the module (``module``), the prompt grid (``prompts``), the output folder's records (``manifest``), the
generation writer (``writer``) and the x̂₀ trajectory callback (``trajectory``). It never imports the NST wing.
"""
