"""The training loop, optimizer, schedules, metrics and checkpoints."""
