"""The distributed pipeline: configs, Ray Data stages, training, tracking."""
