"""The worker service: ``celery -A worker worker`` runs stylize workers, ``celery -A worker
flower`` monitors them. ``app`` is the Celery application, configured from ``CAPVST_*``."""

from capvst.settings import Settings

from .config import create_app

app = create_app(Settings())
celery = app

from . import tasks  # noqa: E402,F401  (registers the tasks on app)
