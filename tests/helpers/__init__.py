"""Helpers the test modules share: tiny models, adapters written the slow obvious way, the CLI in a subprocess.

(The ``*_worker.py`` files here are scripts that tests start as separate processes.)
"""
