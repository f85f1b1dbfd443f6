"""The diffusion family: task 'diffusion' (a U-Net denoiser on digits or CIFAR-10; the images come from
train_lib.image_data), sample quality (FCD/KID) and the sampling/NLL/table CLI (python -m train_lib.diffusion.sample)."""
