"""The stylize worker service: ``celery -A worker worker`` runs stylize workers, ``celery -A
worker flower`` monitors them. ``app`` is the Celery application, configured from
``CAPVST_*``."""

from capvst.broker import create_app
from capvst.settings import Settings

app = create_app(Settings(), include=("worker.tasks", "worker.video"))
celery = app
