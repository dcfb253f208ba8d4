"""The ``gpuyard`` command line (SPEC section 9)."""

from __future__ import annotations

import click

__all__ = ["main", "cli"]


@click.group()
def cli() -> None:
    """gpuyard: a job queue for GPU training jobs."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--data-dir", envvar="GPUYARD_DATA_DIR", default=None,
              help="Data directory (default: GPUYARD_DATA_DIR, else ~/.gpuyard).")
@click.option("--gpus", envvar="GPUYARD_GPUS", default=None,
              help="GPU inventory instead of NVML: none, 4, 4xA100:40, 2xH100:80,2xL4:24.")
def serve(host: str, port: int, data_dir: str | None, gpus: str | None) -> None:
    """Start the server (the engine, the API and the local executor)."""
    from service.serve import serve as run_server

    run_server(host=host, port=port, data_dir=data_dir, gpus=gpus)


def main() -> None:
    cli()
