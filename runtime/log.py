"""The runtime's logger: ``recipe_compiler.runtime``, named after the distribution that ships it.

``runtime`` is the import name, but a logger called ``runtime`` would share its name with any other
project's; under ``recipe_compiler`` one ``logging.getLogger("recipe_compiler")`` configures the
compiler and the runtime together. The runtime logs at INFO, once per reason (a prompt without image
tokens, a static cache, ...), never per request.

Example:
    >>> import logging                                              # doctest: +SKIP
    >>> logging.getLogger("recipe_compiler.runtime").setLevel(logging.INFO)   # doctest: +SKIP
"""
import logging

LOGGER_NAME = "recipe_compiler.runtime"
logger = logging.getLogger(LOGGER_NAME)
