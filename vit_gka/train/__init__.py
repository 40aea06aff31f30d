"""The training job: Hydra entry point, recipe, loop, checkpoints and results (Accelerate, TensorBoard)."""
