"""The job a user runs: YAML config, model building, staged and iterative pruning with resume,
evaluation, and the subcommands behind the CLI."""
