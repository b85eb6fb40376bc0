"""From slices to a bundle: losses, schedule, the methods (baseline, CPS, SA-CPS, ST, SA-ST), synthesizer training."""
