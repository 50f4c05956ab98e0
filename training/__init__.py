"""Models (Gumbel-VQGAN, diffusion transformer, CLIP conditioning), losses and the `cvqd-train` command."""
