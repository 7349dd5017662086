"""Training: the run's set-up and its plan, the loop, its evaluations and checkpoints, the step, the
optimizer, parallel strategies, many hosts, logs and progress, the command."""
