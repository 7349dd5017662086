"""Training: the run's set-up, the step, the optimizer, parallel strategies, many hosts, logs, the command."""
