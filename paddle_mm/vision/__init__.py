"""The image encoders."""
