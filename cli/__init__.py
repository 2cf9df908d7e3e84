"""The `gptoss-mac` command: a thin Typer app over mlx_gptoss (installed as mlx_gptoss.cli)."""
