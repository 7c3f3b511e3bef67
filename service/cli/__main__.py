"""`python -m oodserve.cli ...`"""

from oodserve.cli.main import app

app()
