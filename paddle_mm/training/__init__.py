"""Training: the one loop, the stage objectives, optimizer and schedule, checkpoints and resume,
distributed runs, the run log (docs/ARCHITECTURE.md)."""
