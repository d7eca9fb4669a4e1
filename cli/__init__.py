"""The `rellax` command line (`cli.main`): the top layer, which registers every package's commands."""
