"""The logic behind the scripts in bench/ (which only parse arguments and print)."""
