"""Learned super-resolution: Real-ESRGAN's architectures, verified model loading, tiled inference."""
