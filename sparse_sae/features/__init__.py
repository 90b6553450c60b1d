"""The feature browser: top-activating examples of each latent as a static site (``sparse-sae features``)."""
