"""The 'vae' family: hierarchical VAEs of images (NVAE, `models.nvae`) trained by the generic trainer."""
