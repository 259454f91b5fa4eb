"""A stand-in for the Celery worker: holds a database connection and polls for new orders."""

import time

from django.core.management.base import BaseCommand
from django.db import OperationalError, connection

from shop.models import Order


class Command(BaseCommand):
    help = "Poll the database every few seconds, like a worker waiting for jobs."

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=2.0)

    def handle(self, *args, interval, **options):
        while True:
            try:
                latest = (
                    Order.objects.filter(status="new")
                    .order_by("-id")
                    .values_list("id", flat=True)
                    .first()
                )
                self.stdout.write(f"worker: latest new order {latest}")
            except OperationalError as exc:
                self.stderr.write(f"worker: database unavailable: {exc}")
                connection.close()
            self.stdout.flush()
            time.sleep(interval)
