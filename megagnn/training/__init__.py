"""Training loop, losses, schedules and checkpoints."""
