"""Checkpoint files, below the networks, training and interop that read and write them: atomic
saves, `weights_only` loading, one run's rolling and permanent files, resume by step (`files`)."""
