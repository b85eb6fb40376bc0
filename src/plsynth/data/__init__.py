"""From disk to slices: reading CT, intensity windows, lung masks, semantic maps, datasets, phantoms."""
