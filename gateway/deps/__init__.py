"""Every private name of a dependency the gateway uses, one module per dependency.

The rest of the code calls only what these modules define. tests/test_dependencies.py checks,
on the installed versions, that each private name still exists, and pyproject.toml pins these
dependencies below their next minor (or major) version: a release that renames one fails
there, loudly, before it fails in a mail session.
"""
