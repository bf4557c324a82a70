"""Training state on disk: model weights (checkpoint), whole training checkpoints (training_state), atomic files
(durable) and signal handling (interrupts). Imports config and host."""
