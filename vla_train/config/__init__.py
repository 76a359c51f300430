"""Draccus configuration dataclasses and their registries (selected on the command line with `--x.type <id>`)."""
