"""The scheduler's Celery application: ``celery -A scheduler.app worker -Q capvst.schedule``
(``capvst scheduler`` runs exactly that)."""

from capvst.broker import create_app
from capvst.settings import Settings

app = create_app(Settings(), include=("scheduler.tasks",))
celery = app
