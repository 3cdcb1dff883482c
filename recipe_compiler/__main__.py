"""``python -m recipe_compiler compile|inspect|eval …``: the ``recipe-compiler`` command group."""
import sys

from recipe_compiler.cli import group_main

if __name__ == "__main__":
    sys.exit(group_main(prog="python -m recipe_compiler"))
