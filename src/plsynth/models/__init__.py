"""Networks: the U-Net segmenter and the SEAN style encoder, decoder and discriminator."""
