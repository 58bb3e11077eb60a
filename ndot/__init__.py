"""ndot: online training of spiking neural networks (NDOT, OTTT, SLTT, BPTT)."""
