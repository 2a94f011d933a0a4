"""`stalwart verify`: run every op, layer and a short training curve on a device and compare
them with a float64 CPU reference, so that a young backend's wrong kernels are found before
a long run, not in its loss curve."""
