"""Three pages: the home page reads the database (so 200 means the app and its database work),
the load balancer's health check, and a write check (POST adds a site note: 200 means the app
writes to a primary)."""

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, HttpResponseNotAllowed
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


def write_check(request):
    """POST: add a site note through the app's database (a primary takes it) and answer its id."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    note = SiteNote.objects.create(text=request.POST.get("text", "write check")[:200])
    return HttpResponse(f"note {note.id}\n", content_type="text/plain")
