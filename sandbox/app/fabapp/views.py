"""Two pages: the home page reads the database (so 200 means the app and its database work), and
the load balancer's health check."""

from django.conf import settings
from django.db import connection
from django.http import HttpResponse
from shop.models import Order, SiteNote


def home(request):
    latest = Order.objects.order_by("-id").values_list("id", flat=True).first()
    notes = SiteNote.objects.count()  # the table migration 0002 creates: proves migrations ran
    return HttpResponse(
        f"myproject {settings.ENVIRONMENT}: database {connection.settings_dict['NAME']}, "
        f"latest order {latest}, {notes} site notes\n",
        content_type="text/plain",
    )


def healthcheck(request):
    return HttpResponse("OK\n", content_type="text/plain")
