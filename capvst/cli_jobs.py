"""Job commands (filled in with the pipeline)."""
import argparse


def add_commands(sub) -> None:  # noqa: ANN001
    pass


def submit_parser() -> argparse.ArgumentParser:
    raise NotImplementedError
