"""The self-supervised image family: SimSiam and BYOL on 8×8 digits (`task.SiameseTask`), its augmentations
and its evaluation by a linear probe and k-NN (`python -m train_lib.selfsup.probe`)."""
