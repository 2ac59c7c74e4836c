"""The `trace` subcommands: each module parses nothing itself, runs one command and returns an outcome for cli.exit_code."""
