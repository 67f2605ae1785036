"""`make demo`: the whole pipeline on offline defaults (see demo/__main__.py)."""
