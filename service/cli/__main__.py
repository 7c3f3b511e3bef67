"""`python -m service.cli ...`"""

from service.cli.main import app

app()
