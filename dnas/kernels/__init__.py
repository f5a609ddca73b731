"""Backend-specific kernel formulations, chosen by a :class:`dnas.backend.KernelPolicy`."""
