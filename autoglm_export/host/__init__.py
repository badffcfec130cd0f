"""Host-side logic that the runner and both demo apps implement: prompt, pixels, positions, loop."""
