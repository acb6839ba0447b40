"""Infer and train tasks of the U-Lite MONAI Label app, and helpers around the bundle."""
